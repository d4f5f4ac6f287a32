// A Node.js client of a secured control plane: TLS verified against the mesh's CA,
// mTLS with a certificate naming a SPIFFE identity, and a bearer token in metadata.
// Proves the security settings work for services written in other languages.
// Run (see tests/security/test_polyglot_security.py): FLEXT_MESH_ADDRESS, FLEXT_MESH_TLS_CA,
// FLEXT_MESH_TLS_CERT/KEY (a certificate naming no identity), FLEXT_MESH_ID_CERT/KEY (one
// naming spiffe://flext-mesh/service/node-orders), FLEXT_MESH_TOKEN (service:node-payments).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `set ${name}`);
  return value;
};
const TIMEOUT = 15_000;

const definition = protoLoader.loadSync(['flext_mesh/v1/registry.proto'], {
  includeDirs: [path.join(REPO, 'protos')],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { RegistryService } = grpc.loadPackageDefinition(definition).flext_mesh.v1;

function register(client, service, id, metadata = new grpc.Metadata()) {
  const request = {
    instance: {
      service_name: service,
      instance_id: id,
      endpoint: '127.0.0.1:9',
      health_check_mode: 'HEALTH_CHECK_MODE_TTL_ONLY',
    },
    ttl: { seconds: 30 },
  };
  return new Promise((resolve, reject) => {
    client.Register(request, metadata, { deadline: Date.now() + 5_000 }, (err, res) =>
      err ? reject(err) : resolve(res),
    );
  });
}

async function rejectsWith(promise, code) {
  try {
    await promise;
  } catch (err) {
    assert.equal(err.code, code, `expected status ${code}, got ${err.code}: ${err.details}`);
    return err;
  }
  assert.fail(`expected status ${code}, the call succeeded`);
}

const bearer = (token) => {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${token}`);
  return metadata;
};

describe('a secured control plane from a Node.js client', () => {
  let tlsOnly; // a certificate the CA signed, naming no identity: the token decides
  let mutual; // a certificate naming service node-orders
  const client = (cert, key) =>
    new RegistryService(
      env('FLEXT_MESH_ADDRESS'),
      grpc.credentials.createSsl(
        fs.readFileSync(env('FLEXT_MESH_TLS_CA')),
        fs.readFileSync(env(key)),
        fs.readFileSync(env(cert)),
      ),
    );
  before(() => {
    tlsOnly = client('FLEXT_MESH_TLS_CERT', 'FLEXT_MESH_TLS_KEY');
    mutual = client('FLEXT_MESH_ID_CERT', 'FLEXT_MESH_ID_KEY');
  });
  after(() => {
    tlsOnly?.close();
    mutual?.close();
  });

  it('is refused without credentials', { timeout: TIMEOUT }, async () => {
    const err = await rejectsWith(
      register(tlsOnly, 'node-payments', 'np-0'),
      grpc.status.UNAUTHENTICATED,
    );
    assert.match(err.details, /token|spiffe/);
  });

  it('registers its own service with a token, and only that', { timeout: TIMEOUT }, async () => {
    const token = env('FLEXT_MESH_TOKEN');
    const res = await register(tlsOnly, 'node-payments', 'np-1', bearer(token));
    assert.equal(res.instance.instance_id, 'np-1');
    const err = await rejectsWith(
      register(tlsOnly, 'orders', 'o-1', bearer(token)),
      grpc.status.PERMISSION_DENIED,
    );
    assert.match(err.details, /service:orders/);
    await rejectsWith(
      register(tlsOnly, 'node-payments', 'np-2', bearer('fm_not-a-token')),
      grpc.status.UNAUTHENTICATED,
    );
  });

  it('is its certificate identity over mTLS', { timeout: TIMEOUT }, async () => {
    const res = await register(mutual, 'node-orders', 'no-1');
    assert.equal(res.instance.service_name, 'node-orders');
    await rejectsWith(register(mutual, 'node-payments', 'np-3'), grpc.status.PERMISSION_DENIED);
  });
});

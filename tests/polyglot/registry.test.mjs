// A real Node.js client of flext-mesh's RegistryService, built only from protos/ with
// @grpc/proto-loader: proves the contracts work outside Python.
// Run: FLEXT_MESH_ADDRESS=127.0.0.1:50051 node --test tests/polyglot/registry.test.mjs
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const ADDRESS = process.env.FLEXT_MESH_ADDRESS;
const SERVICE = 'node-payments';
const TIMEOUT = 15_000; // per test
const DEADLINE_MS = 5_000; // per call

// protobufjs resolved the way proto-loader resolves it (it is proto-loader's parser).
const protobuf = createRequire(createRequire(import.meta.url).resolve('@grpc/proto-loader'))(
  'protobufjs',
);

// google/rpc/status.proto and error_details.proto are not shipped in node_modules:
// the two messages needed here, with the same package, names and field numbers.
const rpcRoot = new protobuf.Root();
rpcRoot.addJSON(protobuf.common.get('google/protobuf/any.proto').nested);
protobuf.parse(
  `
  syntax = "proto3";
  package google.rpc;
  import "google/protobuf/any.proto";
  message Status { int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3; }
  message BadRequest {
    message FieldViolation { string field = 1; string description = 2; }
    repeated FieldViolation field_violations = 1;
  }
`,
  rpcRoot,
  { keepCase: true },
);
rpcRoot.resolveAll();
const RpcStatus = rpcRoot.lookupType('google.rpc.Status');
const BadRequest = rpcRoot.lookupType('google.rpc.BadRequest');
const BAD_REQUEST_URL = 'type.googleapis.com/google.rpc.BadRequest';

const packageDefinition = protoLoader.loadSync(['flext_mesh/v1/registry.proto'], {
  includeDirs: [path.join(REPO, 'protos')],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { RegistryService } = grpc.loadPackageDefinition(packageDefinition).flext_mesh.v1;

let client;

const deadline = () => ({ deadline: Date.now() + DEADLINE_MS });

/** A unary call as a promise. */
function unary(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, deadline(), (err, response) => (err ? reject(err) : resolve(response)));
  });
}

/** Expects `promise` to fail with gRPC `code`; returns the error. */
async function rejectsWith(promise, code) {
  try {
    await promise;
  } catch (err) {
    assert.equal(err.code, code, `expected status ${code}, got ${err.code}: ${err.details}`);
    return err;
  }
  assert.fail(`expected status ${code}, the call succeeded`);
}

function instance(id, port, version, weight, zone) {
  return {
    service_name: SERVICE,
    instance_id: id,
    endpoint: `127.0.0.1:${port}`,
    version,
    weight,
    labels: { zone },
    health_check_mode: 'HEALTH_CHECK_MODE_TTL_ONLY',
  };
}

const leases = {};

describe('RegistryService from a Node.js client', () => {
  before(() => {
    assert.ok(ADDRESS, 'set FLEXT_MESH_ADDRESS to host:port of a running control plane');
    client = new RegistryService(ADDRESS, grpc.credentials.createInsecure());
  });

  after(() => client?.close());

  it('registers two instances under leases', { timeout: TIMEOUT }, async () => {
    const specs = [
      instance('node-1', 7001, '1.0.0', 1, 'a'),
      instance('node-2', 7002, '2.0.0', 3, 'b'),
    ];
    for (const spec of specs) {
      const res = await unary('Register', { instance: spec, ttl: { seconds: 30 } });
      assert.equal(res.instance.service_name, SERVICE);
      assert.equal(res.instance.instance_id, spec.instance_id);
      assert.equal(res.instance.endpoint, spec.endpoint);
      assert.equal(res.instance.version, spec.version);
      assert.equal(res.instance.weight, spec.weight);
      assert.deepEqual(res.instance.labels, spec.labels);
      assert.equal(res.instance.health_check_mode, 'HEALTH_CHECK_MODE_TTL_ONLY');
      assert.ok(res.lease.lease_id, 'a lease id');
      assert.equal(res.instance.lease_id, res.lease.lease_id);
      assert.equal(res.lease.ttl.seconds, '30'); // int64 as String (longs: String)
      assert.ok(Number(res.lease.expire_time.seconds) > Date.now() / 1000);
      assert.ok(BigInt(res.revision) > 0n, `revision ${res.revision}`);
      leases[spec.instance_id] = res.lease.lease_id;
    }
    assert.notEqual(leases['node-1'], leases['node-2']);
  });

  it('renews leases by Heartbeat and over a KeepAlive stream', { timeout: TIMEOUT }, async () => {
    const beat = await unary('Heartbeat', { lease_id: leases['node-1'] });
    assert.equal(beat.lease.lease_id, leases['node-1']);
    assert.equal(beat.lease.ttl.seconds, '30');

    const stream = client.KeepAlive(deadline());
    const statusSeen = new Promise((resolve) => stream.on('status', resolve));
    const responses = [];
    const ended = new Promise((resolve, reject) => {
      stream.on('data', (message) => responses.push(message));
      stream.on('end', resolve);
      stream.on('error', reject);
    });
    const first = new Promise((resolve) => stream.once('data', resolve));
    stream.write({ lease_ids: [leases['node-1'], leases['node-2'], 'no-such-lease'] });
    const res = await first;
    stream.end();
    await ended;
    assert.equal((await statusSeen).code, grpc.status.OK);

    assert.equal(responses.length, 1, 'one response per request');
    const renewed = res.leases.map((l) => l.lease_id).sort();
    assert.deepEqual(renewed, [leases['node-1'], leases['node-2']].sort());
    for (const lease of res.leases) assert.equal(lease.ttl.seconds, '30');
    assert.deepEqual(res.expired_lease_ids, ['no-such-lease']);
  });

  it('discovers by smooth weighted round robin', { timeout: TIMEOUT }, async () => {
    const firsts = { 'node-1': 0, 'node-2': 0 };
    for (let i = 0; i < 40; i += 1) {
      const res = await unary('Discover', { service_name: SERVICE });
      assert.equal(res.strategy, 'LOAD_BALANCING_STRATEGY_WEIGHTED_ROUND_ROBIN');
      assert.deepEqual(res.instances.map((x) => x.instance_id).sort(), ['node-1', 'node-2']);
      for (const x of res.instances) {
        assert.equal(x.health, 'HEALTH_STATUS_SERVING', `${x.instance_id} health`);
        assert.ok(x.effective_weight > 0, `${x.instance_id} weight ${x.effective_weight}`);
        assert.equal(x.ejected, false);
      }
      firsts[res.instances[0].instance_id] += 1;
    }
    // Weights 1:3 over 40 picks: 10 and 30, within +-1.
    assert.ok(Math.abs(firsts['node-1'] - 10) <= 1, `node-1 first ${firsts['node-1']} times`);
    assert.ok(Math.abs(firsts['node-2'] - 30) <= 1, `node-2 first ${firsts['node-2']} times`);
  });

  it('discovers by label selector', { timeout: TIMEOUT }, async () => {
    const res = await unary('Discover', { service_name: SERVICE, label_selector: { zone: 'b' } });
    assert.deepEqual(res.instances.map((x) => x.instance_id), ['node-2']);
    assert.deepEqual(res.instances[0].labels, { zone: 'b' });
  });

  it('answers NOT_FOUND for an unknown service', { timeout: TIMEOUT }, async () => {
    const err = await rejectsWith(
      unary('Discover', { service_name: 'no-such-service' }),
      grpc.status.NOT_FOUND,
    );
    assert.ok(err.details, 'a message says what was not found');
  });

  it('lists the service with its counts', { timeout: TIMEOUT }, async () => {
    const res = await unary('ListServices', {});
    const summary = res.services.find((s) => s.service_name === SERVICE);
    assert.ok(summary, `${SERVICE} in ${JSON.stringify(res.services.map((s) => s.service_name))}`);
    assert.equal(summary.instance_count, 2);
    assert.equal(summary.healthy_count, 2);
    assert.equal(summary.unhealthy_count, 0);
    assert.deepEqual(summary.versions, ['1.0.0', '2.0.0']);
  });

  it('watches: snapshot first, then the deregistration', { timeout: TIMEOUT }, async () => {
    // No deadline: a Watch is long-lived; it is cancelled below.
    const stream = client.Watch({ service_names: [SERVICE], from_revision: 0 });
    const messages = [];
    let notify = () => {};
    let streamError = null;
    stream.on('data', (message) => {
      messages.push(message);
      notify();
    });
    const closed = new Promise((resolve) => {
      stream.on('error', (err) => {
        streamError = err;
        notify();
      });
      stream.on('status', resolve);
    });
    /** Waits until `predicate` holds over the messages received so far. */
    const waitFor = (predicate, what) =>
      new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), 8_000);
        const settle = (fn, value) => {
          clearTimeout(timer);
          notify = () => {};
          fn(value);
        };
        notify = () => {
          if (streamError) {
            settle(reject, new Error(`Watch failed waiting for ${what}: ${streamError.message}`));
            return;
          }
          const found = predicate();
          if (found) settle(resolve, found);
        };
        notify();
      });

    try {
      await waitFor(() => messages.length > 0, 'the first Watch message');
      const snapshot = messages[0].snapshot;
      assert.ok(snapshot, 'the first message carries a snapshot');
      assert.deepEqual(snapshot.instances.map((x) => x.instance_id).sort(), ['node-1', 'node-2']);
      assert.ok(BigInt(messages[0].revision) > 0n);

      const dereg = await unary('Deregister', { service_name: SERVICE, instance_id: 'node-1' });
      assert.ok(BigInt(dereg.revision) > 0n);

      const removed = await waitFor(
        () =>
          messages
            .flatMap((m) => m.events)
            .find(
              (e) => e.type === 'WATCH_EVENT_TYPE_REMOVED' && e.instance?.instance_id === 'node-1',
            ),
        'the REMOVED event of node-1',
      );
      assert.equal(removed.service_name, SERVICE);
      assert.equal(removed.removal_reason, 'REMOVAL_REASON_DEREGISTERED');
      assert.equal(removed.revision, dereg.revision);
    } finally {
      stream.cancel();
    }
    const status = await closed;
    assert.equal(status.code, grpc.status.CANCELLED, 'cancelled by the client');
    assert.equal(streamError?.code, grpc.status.CANCELLED);
  });

  it('rejects a bad Register: INVALID_ARGUMENT + BadRequest', { timeout: TIMEOUT }, async () => {
    const err = await rejectsWith(
      unary('Register', { instance: { service_name: '', endpoint: 'nonsense' } }),
      grpc.status.INVALID_ARGUMENT,
    );
    assert.ok(err.details, 'a human-readable message');

    // The structured details: a google.rpc.Status in the trailers, decoded for real.
    const [raw] = err.metadata.get('grpc-status-details-bin');
    assert.ok(Buffer.isBuffer(raw), 'grpc-status-details-bin in the trailers');
    const status = RpcStatus.decode(raw);
    assert.equal(status.code, grpc.status.INVALID_ARGUMENT);
    const detail = status.details.find((d) => d.type_url === BAD_REQUEST_URL);
    assert.ok(detail, `a BadRequest among ${status.details.map((d) => d.type_url)}`);
    const fields = BadRequest.decode(detail.value).field_violations.map((v) => v.field);
    assert.ok(fields.includes('instance.service_name'), `violations: ${fields}`);
    assert.ok(fields.includes('instance.endpoint'), `violations: ${fields}`);
  });
});

// A proxyless Node.js gRPC client (@grpc/grpc-js + @grpc/grpc-js-xds, stubs built only
// from protos/ with @grpc/proto-loader) dialing `xds:///SERVICE`: the control plane's
// ADS feeds its listener, routes, clusters and endpoints; no flext code on its path.
//
// Run with GRPC_XDS_BOOTSTRAP naming a file `flext-mesh xds bootstrap` wrote:
//   node tests/polyglot/xds_client.mjs count xds:///payment 2000
//     N calls (a few in flight), then one JSON line: {instance id or status name: count}
//   node tests/polyglot/xds_client.mjs watch xds:///payment 5
//     calls one after another for 5 s, one line a call: `EPOCH_SECONDS INSTANCE_OR_CODE`
// Either prints `ready` once the first call came back (the xDS resources arrived).
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const require = createRequire(import.meta.url);
require('@grpc/grpc-js-xds').register(); // the xds: resolver and the xDS LB policies

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const [mode, target, amountText] = process.argv.slice(2);
const amount = Number(amountText);
if (!['count', 'watch'].includes(mode) || !target || !(amount > 0)) {
  console.error('usage: xds_client.mjs count|watch xds:///SERVICE CALLS|SECONDS');
  process.exit(2);
}
const IN_FLIGHT = 4; // count mode: calls in flight at once
const DEADLINE_MS = 2_000;
const FIRST_DEADLINE_MS = 15_000; // the first call waits for the xDS resources

const definition = protoLoader.loadSync('flext_mesh/v1/processor.proto', {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [path.join(REPO, 'protos')],
});
const v1 = grpc.loadPackageDefinition(definition).flext_mesh.v1;
// Value member names as proto-loader's bundled struct.proto spells them, by number.
const V = Object.fromEntries(
  definition['google.protobuf.Value'].type.field.map((f) => [f.number, f.name]),
);
const request = {
  operation: 'charge',
  payload: { fields: { customer_id: { [V[3]]: 'c-1' }, amount: { [V[2]]: 1 } } },
};

const client = new v1.ProcessorService(target, grpc.credentials.createInsecure());

/** One Invoke: the answering instance's id, or the status code's name. */
function call(deadlineMs = DEADLINE_MS, waitForReady = false) {
  return new Promise((resolve) => {
    client.Invoke(
      request,
      { deadline: Date.now() + deadlineMs, waitForReady },
      (err, reply) => resolve(err ? grpc.status[err.code] : reply.instance_id),
    );
  });
}

const first = await call(FIRST_DEADLINE_MS, true);
if (first === 'DEADLINE_EXCEEDED' || first === 'UNAVAILABLE') {
  console.error(`the first call failed: ${first}`);
  process.exit(1);
}
console.log('ready');

if (mode === 'count') {
  const counts = {};
  let started = 0;
  const worker = async () => {
    while (started < amount) {
      started += 1;
      const outcome = await call();
      counts[outcome] = (counts[outcome] ?? 0) + 1;
    }
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  console.log(JSON.stringify(counts));
} else {
  const end = Date.now() + amount * 1000;
  while (Date.now() < end) {
    const started = Date.now() / 1000;
    const outcome = await call();
    console.log(`${started.toFixed(3)} ${outcome}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}
client.close();
process.exit(0);

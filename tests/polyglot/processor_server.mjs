// A ProcessorService written in Node.js (@grpc/grpc-js + @grpc/proto-loader, built only
// from protos/): a mesh target in another language, called by the Python MeshClient
// exactly like a Python sidecar. It also serves the standard grpc.health.v1.Health, so
// it registers with HEALTH_CHECK_MODE_GRPC and the control plane checks it for real.
//
// Operations: greet {name} -> {greeting: "hello <name>", runtime: "node"};
//             add {a, b}   -> {sum: a + b}.
// Lifecycle: registers as node-greeter/node-1 (version node-1.0, ttl 10 s) with the
// control plane at FLEXT_MESH_ADDRESS, prints `ready <port>`, heartbeats every 3 s,
// and on SIGTERM drains, deregisters and exits 0.
// Run: FLEXT_MESH_ADDRESS=127.0.0.1:50051 node tests/polyglot/processor_server.mjs
import { randomUUID } from 'node:crypto';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const ADDRESS = process.env.FLEXT_MESH_ADDRESS;
const SERVICE = 'node-greeter';
const INSTANCE_ID = 'node-1';
const VERSION = 'node-1.0';
const TTL_SECONDS = 10;
const HEARTBEAT_MS = 3_000;
const DEADLINE_MS = 5_000; // per call to the control plane
const IDEMPOTENCY_WINDOW_MS = 10 * 60 * 1000;

const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
};

// protobufjs resolved the way proto-loader resolves it (it is proto-loader's parser).
const protobuf = createRequire(createRequire(import.meta.url).resolve('@grpc/proto-loader'))(
  'protobufjs',
);

const definition = protoLoader.loadSync(
  ['flext_mesh/v1/processor.proto', 'flext_mesh/v1/registry.proto'],
  { ...LOADER_OPTIONS, includeDirs: [path.join(REPO, 'protos')] },
);
const v1 = grpc.loadPackageDefinition(definition).flext_mesh.v1;

// grpc/health/v1/health.proto is not in protos/ nor in node_modules: the standard
// service declared here with the same package, names and field numbers.
const healthRoot = protobuf.parse(
  `
  syntax = "proto3";
  package grpc.health.v1;
  message HealthCheckRequest { string service = 1; }
  message HealthCheckResponse {
    enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
    ServingStatus status = 1;
  }
  service Health {
    rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
    rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
  }
`,
  { keepCase: true },
).root;
const { Health } = grpc.loadPackageDefinition(
  protoLoader.fromJSON(healthRoot.toJSON(), LOADER_OPTIONS),
).grpc.health.v1;

// google.rpc.Status + BadRequest, for INVALID_ARGUMENT details (grpc-status-details-bin),
// as registry.test.mjs decodes them.
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

// -- google.protobuf.Struct <-> plain JS ---------------------------------------------------
//
// proto-loader hands a Struct over as {fields: {key: Value}}, each Value an object with
// one member of its `kind` oneof set plus `kind` naming it (oneofs: true). With
// defaults: true the unset oneof members stay absent, so `kind` is the only reliable
// tag. The member names come from protobufjs's bundled struct.proto (camelCase
// `stringValue`, ...), so they are looked up by field number rather than hard-coded.
const valueFields = Object.fromEntries(
  definition['google.protobuf.Value'].type.field.map((f) => [f.number, f.name]),
);
const V = {
  null: valueFields[1],
  number: valueFields[2],
  string: valueFields[3],
  bool: valueFields[4],
  struct: valueFields[5],
  list: valueFields[6],
};

/** A protobuf Value (as proto-loader encodes it) holding JSON-like `data`. */
function toValue(data, where) {
  if (data === null || data === undefined) return { [V.null]: 'NULL_VALUE' };
  switch (typeof data) {
    case 'number':
      if (!Number.isFinite(data)) throw new TypeError(`${where}: ${data} has no JSON form`);
      return { [V.number]: data };
    case 'bigint':
      return { [V.number]: Number(data) };
    case 'string':
      return { [V.string]: data };
    case 'boolean':
      return { [V.bool]: data };
    case 'object':
      if (Array.isArray(data)) {
        return { [V.list]: { values: data.map((item, i) => toValue(item, `${where}[${i}]`)) } };
      }
      return { [V.struct]: toStruct(data, where) };
    default:
      throw new TypeError(`${where}: a ${typeof data} has no JSON form`);
  }
}

/** A protobuf Struct holding the JSON-like object `data`. */
function toStruct(data, where = '$') {
  const fields = {};
  for (const [key, item] of Object.entries(data ?? {})) {
    fields[key] = toValue(item, `${where}.${key}`);
  }
  return { fields };
}

/** Plain JS data from a decoded protobuf Value. */
function fromValue(value) {
  switch (value?.kind) {
    case V.number:
      return value[V.number];
    case V.string:
      return value[V.string];
    case V.bool:
      return value[V.bool];
    case V.struct:
      return fromStruct(value[V.struct]);
    case V.list:
      return (value[V.list]?.values ?? []).map(fromValue);
    default: // nullValue, or a Value with nothing set
      return null;
  }
}

/** A plain JS object from a decoded protobuf Struct (null/absent -> {}). */
function fromStruct(struct) {
  const out = {};
  for (const [key, value] of Object.entries(struct?.fields ?? {})) out[key] = fromValue(value);
  return out;
}

// -- the operations ---------------------------------------------------------------------

/** A business rejection: travels as `code` with `message` (and BadRequest violations). */
class Rejection extends Error {
  constructor(code, message, violations = []) {
    super(message);
    this.code = code;
    this.violations = violations;
  }
}

const invalid = (field, description) =>
  new Rejection(grpc.status.INVALID_ARGUMENT, `invalid request: ${field}: ${description}`, [
    { field, description },
  ]);

const OPERATIONS = {
  add: {
    description: 'Adds two numbers.',
    schema: {
      type: 'object',
      properties: { a: { type: 'number' }, b: { type: 'number' } },
      required: ['a', 'b'],
      additionalProperties: false,
    },
    run({ a, b }) {
      for (const [field, value] of [
        ['a', a],
        ['b', b],
      ]) {
        if (typeof value !== 'number' || !Number.isFinite(value)) {
          throw invalid(field, 'must be a number');
        }
      }
      return { sum: a + b };
    },
  },
  greet: {
    description: 'Greets someone by name.',
    schema: {
      type: 'object',
      properties: { name: { type: 'string', minLength: 1 } },
      required: ['name'],
      additionalProperties: false,
    },
    run({ name }) {
      if (typeof name !== 'string' || name === '') {
        throw invalid('name', 'a non-empty name is required');
      }
      return { greeting: `hello ${name}`, runtime: 'node' };
    },
  },
};
const KNOWN = Object.keys(OPERATIONS).sort();

// -- ProcessorService ---------------------------------------------------------------------

let draining = false;
const idempotent = new Map(); // idempotency_key -> {at, response}

/** A grpc-js error object: code, message and, for INVALID_ARGUMENT, BadRequest details. */
function statusError(code, message, violations = [], trailer = new grpc.Metadata()) {
  if (violations.length) {
    const status = RpcStatus.encode(
      RpcStatus.create({
        code,
        message,
        details: [
          {
            type_url: 'type.googleapis.com/google.rpc.BadRequest',
            value: BadRequest.encode(BadRequest.create({ field_violations: violations })).finish(),
          },
        ],
      }),
    ).finish();
    trailer.set('grpc-status-details-bin', Buffer.from(status));
  }
  return { code, details: message, metadata: trailer };
}

function invoke(call, callback) {
  const started = process.hrtime.bigint();
  const request = call.request;
  const [fromMetadata] = call.metadata.get('x-correlation-id');
  const correlationId = request.correlation_id || String(fromMetadata ?? '') || randomUUID();
  const trailer = new grpc.Metadata();
  trailer.set('x-correlation-id', correlationId);

  if (draining) {
    callback(statusError(grpc.status.UNAVAILABLE, `${INSTANCE_ID} is draining`, [], trailer));
    return;
  }
  const key = request.idempotency_key;
  const now = Date.now();
  for (const [k, entry] of idempotent) {
    if (now - entry.at > IDEMPOTENCY_WINDOW_MS) idempotent.delete(k);
  }
  if (key && idempotent.has(key)) {
    callback(null, { ...idempotent.get(key).response, replayed: true }, trailer);
    return;
  }
  const operation = OPERATIONS[request.operation];
  if (!operation) {
    const message =
      `unknown operation '${request.operation}' of ${SERVICE}; ` +
      `known operations: ${KNOWN.join(', ')}`;
    callback(statusError(grpc.status.NOT_FOUND, message, [], trailer));
    return;
  }
  try {
    const result = operation.run(fromStruct(request.payload));
    const response = {
      result: toStruct(result),
      correlation_id: correlationId,
      duration_ms: Number(process.hrtime.bigint() - started) / 1e6,
      instance_id: INSTANCE_ID,
      replayed: false,
    };
    if (key) idempotent.set(key, { at: now, response });
    callback(null, response, trailer);
  } catch (err) {
    if (err instanceof Rejection) {
      callback(statusError(err.code, err.message, err.violations, trailer));
    } else {
      console.error(`operation ${request.operation} failed:`, err);
      callback(statusError(grpc.status.INTERNAL, `internal error: ${err.message}`, [], trailer));
    }
  }
}

function listOperations(_call, callback) {
  callback(null, {
    operations: KNOWN.map((name) => ({
      name,
      description: OPERATIONS[name].description,
      request_schema: toStruct(OPERATIONS[name].schema),
    })),
    service_name: SERVICE,
    instance_id: INSTANCE_ID,
    version: VERSION,
  });
}

// -- grpc.health.v1.Health ------------------------------------------------------------------

const HEALTH_NAMES = new Set(['', SERVICE, 'flext_mesh.v1.ProcessorService']);
const watchers = new Set();
const servingStatus = () => (draining ? 'NOT_SERVING' : 'SERVING');

function check(call, callback) {
  if (!HEALTH_NAMES.has(call.request.service)) {
    callback({ code: grpc.status.NOT_FOUND, details: `unknown service '${call.request.service}'` });
    return;
  }
  callback(null, { status: servingStatus() });
}

function watch(call) {
  const known = HEALTH_NAMES.has(call.request.service);
  call.write({ status: known ? servingStatus() : 'SERVICE_UNKNOWN' });
  watchers.add(call); // open until the client cancels or this server stops
  call.on('cancelled', () => watchers.delete(call));
}

/** Tells every Watch the final status and ends it (on shutdown). */
function endWatches() {
  for (const call of watchers) {
    if (HEALTH_NAMES.has(call.request.service)) call.write({ status: servingStatus() });
    call.end();
  }
  watchers.clear();
}

// -- registration ---------------------------------------------------------------------------

const deadline = () => ({ deadline: Date.now() + DEADLINE_MS });

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, deadline(), (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function main() {
  if (!ADDRESS) {
    console.error('set FLEXT_MESH_ADDRESS to host:port of a running control plane');
    process.exit(2);
  }
  const server = new grpc.Server();
  server.addService(v1.ProcessorService.service, {
    Invoke: invoke,
    ListOperations: listOperations,
  });
  server.addService(Health.service, { Check: check, Watch: watch });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, bound) =>
      err ? reject(err) : resolve(bound),
    );
  });

  const registry = new v1.RegistryService(ADDRESS, grpc.credentials.createInsecure());
  const registration = {
    instance: {
      service_name: SERVICE,
      instance_id: INSTANCE_ID,
      endpoint: `127.0.0.1:${port}`,
      version: VERSION,
      type: 'greeter',
      health_check_mode: 'HEALTH_CHECK_MODE_GRPC',
      metadata: toStruct({ runtime: 'node', node_version: process.version }),
    },
    ttl: { seconds: TTL_SECONDS },
  };
  let leaseId = (await unary(registry, 'Register', registration)).lease.lease_id;

  let timer = null;
  let stopping = false;
  const beat = async () => {
    try {
      leaseId = (await unary(registry, 'Heartbeat', { lease_id: leaseId })).lease.lease_id;
    } catch (err) {
      if (stopping) return;
      if (err.code === grpc.status.NOT_FOUND) {
        // The lease expired (or the control plane lost it): register again.
        try {
          leaseId = (await unary(registry, 'Register', registration)).lease.lease_id;
        } catch (again) {
          console.error(`re-register failed: ${again.message}`);
        }
      } else {
        console.error(`heartbeat failed: ${err.message}`);
      }
    }
    if (!stopping) timer = setTimeout(beat, HEARTBEAT_MS);
  };
  timer = setTimeout(beat, HEARTBEAT_MS);

  const shutdown = async (signal) => {
    if (stopping) return;
    stopping = true;
    draining = true;
    clearTimeout(timer);
    endWatches();
    let code = 0;
    try {
      await unary(registry, 'Deregister', { service_name: SERVICE, instance_id: INSTANCE_ID });
    } catch (err) {
      console.error(`deregister failed: ${err.message}`);
      code = 1;
    }
    registry.close();
    await new Promise((resolve) => {
      const force = setTimeout(() => {
        server.forceShutdown();
        resolve();
      }, 2_000);
      server.tryShutdown(() => {
        clearTimeout(force);
        resolve();
      });
    });
    console.error(`stopped on ${signal}`);
    process.exit(code);
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));

  process.stdout.write(`ready ${port}\n`);
}

main().catch((err) => {
  console.error(`processor_server failed: ${err.stack ?? err}`);
  process.exit(1);
});

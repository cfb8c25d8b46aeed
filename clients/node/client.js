#!/usr/bin/env node
// A Node.js client of the Nexus gRPC server, built only from the `.proto` files that
// `nexus proto export APP --out DIR` writes (no generated code, no build step).
//
//   node clients/node/client.js --protos DIR --server 127.0.0.1:50051 \
//       [--name "Ada Lovelace"] [--email ada@example.org] [--company Acme] [--timeout 10]
//       [--inputs '{"name": "Ada", "email": "ada@example.org"}']
//
// It runs the `create_contact` workflow (WorkflowService.ExecuteWorkflow, inputs as a
// google.protobuf.Struct), reads the created contact back through the typed
// `nexus.models.v1.ContactService/GetContact`, lists contacts with that email
// (`ListContacts`, filter as a Struct), and prints one JSON document to stdout. A failed
// call prints the gRPC status (code, name, details, ErrorInfo/BadRequest when present)
// to stderr as JSON and exits with status 1; a usage error exits with status 2.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const EXIT_RPC = 1;
const EXIT_USAGE = 2;

const WORKFLOW_PROTO = "nexus/workflow/v1/workflow_service.proto";
const MODELS_PROTO = "nexus/models/v1/models.proto";
const STATUS_PROTOS = ["google/rpc/status.proto", "google/rpc/error_details.proto"];

// How protobufjs (through proto-loader) maps messages to JavaScript objects:
// - keepCase: the proto field names (`request_id`), as in proto3 JSON output;
// - longs: String: int64 as decimal strings (proto3 JSON does the same), so no precision
//   is lost and no `long` objects leak into the output;
// - enums: String: `STATE_SUCCEEDED`, not 3;
// - defaults: false and oneofs: false: only fields that are set appear, so a proto3
//   `optional` field that the server left unset is absent, not "" or "0", and a
//   Struct's Value shows exactly one of its `kind` members.
const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: false,
  oneofs: false,
};

function usage(message, code = EXIT_USAGE) {
  if (message) process.stderr.write(`client.js: ${message}\n`);
  (code === 0 ? process.stdout : process.stderr).write(
    "usage: node clients/node/client.js --protos DIR --server HOST:PORT " +
      "[--name NAME] [--email EMAIL] [--company COMPANY] [--inputs JSON] [--timeout SECONDS]\n",
  );
  process.exit(code);
}

function parseArgs(argv) {
  const known = new Set(["protos", "server", "name", "email", "company", "inputs", "timeout"]);
  const args = {};
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === "-h" || arg === "--help") usage(undefined, 0);
    const match = /^--([a-z]+)(?:=(.*))?$/.exec(arg);
    if (!match || !known.has(match[1])) usage(`unknown argument ${JSON.stringify(arg)}`);
    let value = match[2];
    if (value === undefined) {
      i += 1;
      if (i >= argv.length) usage(`--${match[1]} needs a value`);
      value = argv[i];
    }
    args[match[1]] = value;
  }
  if (!args.protos) usage("--protos is required");
  if (!args.server) usage("--server is required");
  const suffix = `${process.pid}-${Date.now()}`;
  args.name = args.name ?? "Ada Lovelace";
  args.email = args.email ?? `ada-${suffix}@example.org`;
  args.timeout = Number(args.timeout ?? "10");
  if (!(args.timeout > 0)) usage("--timeout must be a positive number of seconds");
  // --inputs JSON: the workflow's inputs as they are (for trying out validation errors);
  // otherwise they are made from --name, --email and --company.
  if (args.inputs !== undefined) {
    try {
      args.inputs = JSON.parse(args.inputs);
    } catch (err) {
      usage(`--inputs is not JSON: ${err.message}`);
    }
    if (args.inputs === null || typeof args.inputs !== "object" || Array.isArray(args.inputs)) {
      usage("--inputs must be a JSON object");
    }
  } else {
    args.inputs = { name: args.name, email: args.email };
    if (args.company !== undefined) args.inputs.company = args.company;
  }
  return args;
}

// ---- google.protobuf.Struct <-> plain JavaScript values ---------------------------------
// protobufjs has no JSON mapping for Struct/Value (it has one for Any only), so a Struct
// travels in its proto shape: {fields: {name: {<string value field>: "Ada"}}}. The name of
// each Value member depends on where protobufjs took struct.proto from: it substitutes its
// bundled copy of every google/protobuf/*.proto import (same field numbers and wire
// format, but camelCase names: `stringValue`), and keepCase keeps whatever the definition
// says. So the names are read from the loaded Value descriptor by field number instead of
// being guessed.

const VALUE_FIELD_NUMBERS = { null: 1, number: 2, string: 3, bool: 4, struct: 5, list: 6 };

function valueFieldNames(definition) {
  const fields = definition["google.protobuf.Value"]?.type?.field ?? [];
  const names = {};
  for (const [kind, number] of Object.entries(VALUE_FIELD_NUMBERS)) {
    const field = fields.find((f) => f.number === number);
    if (!field) throw new Error("google.protobuf.Value is not loaded (is struct.proto exported?)");
    names[kind] = field.name;
  }
  return names;
}

class StructCodec {
  constructor(names) {
    this.n = names;
  }

  toValue(v) {
    const n = this.n;
    if (v === null || v === undefined) return { [n.null]: "NULL_VALUE" };
    if (typeof v === "string") return { [n.string]: v };
    if (typeof v === "number") return { [n.number]: v };
    if (typeof v === "boolean") return { [n.bool]: v };
    if (Array.isArray(v)) return { [n.list]: { values: v.map((x) => this.toValue(x)) } };
    if (typeof v === "object") return { [n.struct]: this.toStruct(v) };
    throw new TypeError(`cannot put a ${typeof v} into a google.protobuf.Value`);
  }

  toStruct(obj) {
    const fields = {};
    for (const [k, v] of Object.entries(obj)) fields[k] = this.toValue(v);
    return { fields };
  }

  fromValue(v) {
    const n = this.n;
    if (v === undefined || v === null || n.null in v) return null;
    if (n.string in v) return v[n.string];
    if (n.number in v) return v[n.number];
    if (n.bool in v) return v[n.bool];
    if (n.list in v) return (v[n.list].values ?? []).map((x) => this.fromValue(x));
    if (n.struct in v) return this.fromStruct(v[n.struct]);
    return null; // a Value with no kind set reads as null, as in proto3 JSON
  }

  fromStruct(s) {
    const out = {};
    for (const [k, v] of Object.entries(s?.fields ?? {})) out[k] = this.fromValue(v);
    return out;
  }
}

// ---- well-known types to their proto3 JSON text ----------------------------------------

// Fractional seconds as proto3 JSON prints them: 0, 3, 6 or 9 digits.
function fraction(nanos) {
  if (!nanos) return "";
  const digits = String(nanos).padStart(9, "0");
  if (nanos % 1e6 === 0) return `.${digits.slice(0, 3)}`;
  if (nanos % 1e3 === 0) return `.${digits.slice(0, 6)}`;
  return `.${digits}`;
}

function timestampJson(ts) {
  if (!ts) return null;
  const whole = new Date(Number(ts.seconds ?? 0) * 1000).toISOString().slice(0, 19);
  return `${whole}${fraction(ts.nanos ?? 0)}Z`;
}

function durationJson(d) {
  if (!d) return null;
  const seconds = Number(d.seconds ?? 0);
  const nanos = d.nanos ?? 0;
  const sign = seconds < 0 || nanos < 0 ? "-" : "";
  return `${sign}${Math.abs(seconds)}${fraction(Math.abs(nanos))}s`;
}

function executionJson(e, structs) {
  return {
    id: e.id,
    workflow: e.workflow,
    state: e.state,
    inputs: structs.fromStruct(e.inputs),
    outputs: structs.fromStruct(e.outputs),
    error: e.error ?? null,
    request_id: e.request_id ?? "",
    create_time: timestampJson(e.create_time),
    start_time: timestampJson(e.start_time),
    end_time: timestampJson(e.end_time),
    duration: durationJson(e.duration),
  };
}

function contactJson(c) {
  const out = {};
  for (const [k, v] of Object.entries(c)) {
    out[k] = k === "created_at" || k === "updated_at" ? timestampJson(v) : v;
  }
  return out;
}

// ---- loading the exported protos -------------------------------------------------------

function loadProtos(dir) {
  for (const file of [WORKFLOW_PROTO, MODELS_PROTO]) {
    if (!fs.existsSync(path.join(dir, file))) {
      usage(`${path.join(dir, file)} not found: run \`nexus proto export APP --out ${dir}\``);
    }
  }
  // includeDirs: [dir]: our files and their google/api and google/rpc imports come from DIR.
  // google/protobuf/*.proto imports are the one exception: protobufjs always substitutes
  // its bundled copies of those (same messages and wire format; see StructCodec).
  const definition = protoLoader.loadSync([WORKFLOW_PROTO, MODELS_PROTO], {
    ...LOADER_OPTIONS,
    includeDirs: [dir],
  });
  return {
    services: grpc.loadPackageDefinition(definition),
    structs: new StructCodec(valueFieldNames(definition)),
  };
}

// google.rpc.Status from the `grpc-status-details-bin` trailer, decoded with the exported
// google/rpc protos; null when the server sent none or the protos are missing.
function statusDetails(dir, metadata) {
  const raw = metadata?.get("grpc-status-details-bin")?.[0];
  if (!raw || !STATUS_PROTOS.every((f) => fs.existsSync(path.join(dir, f)))) return null;
  // protobufjs is @grpc/proto-loader's own dependency; resolve it from there.
  const protobuf = require(
    require.resolve("protobufjs", { paths: [path.dirname(require.resolve("@grpc/proto-loader"))] }),
  );
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => path.join(dir, target);
  root.loadSync(STATUS_PROTOS, { keepCase: true });
  const toObject = { longs: String, enums: String, defaults: false };
  const Status = root.lookupType("google.rpc.Status");
  const status = Status.toObject(Status.decode(raw), toObject);
  status.details = (status.details ?? []).map((any) => {
    const typeName = String(any.type_url ?? "").split("/").pop();
    let type = null;
    try {
      type = root.lookupType(typeName);
    } catch {
      return { "@type": any.type_url };
    }
    return { "@type": any.type_url, ...type.toObject(type.decode(any.value), toObject) };
  });
  return status;
}

// ---- the calls -------------------------------------------------------------------------

function unary(client, method, request, timeoutSeconds) {
  const deadline = new Date(Date.now() + timeoutSeconds * 1000);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (err, response) => {
      if (err) {
        err.rpcMethod = method;
        reject(err);
      } else {
        resolve(response);
      }
    });
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const { services: protos, structs } = loadProtos(args.protos);
  const credentials = grpc.credentials.createInsecure();
  const workflows = new protos.nexus.workflow.v1.WorkflowService(args.server, credentials);
  const contacts = new protos.nexus.models.v1.ContactService(args.server, credentials);
  try {
    const execution = await unary(
      workflows,
      "ExecuteWorkflow",
      { name: "create_contact", inputs: structs.toStruct(args.inputs) },
      args.timeout,
    );
    const created = structs.fromStruct(execution.outputs).create ?? {};
    if (typeof created.id !== "string") {
      throw new Error(`create_contact returned no contact id: ${JSON.stringify(created)}`);
    }
    const contact = await unary(contacts, "GetContact", { id: created.id }, args.timeout);
    const listed = await unary(
      contacts,
      "ListContacts",
      { filter: structs.toStruct({ email: contact.email }), order_by: "name", page_size: 10 },
      args.timeout,
    );
    const result = {
      server: args.server,
      execution: executionJson(execution, structs),
      contact: contactJson(contact),
      list: {
        contacts: (listed.contacts ?? []).map(contactJson),
        next_page_token: listed.next_page_token ?? "",
      },
    };
    process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
  } catch (err) {
    if (typeof err.code !== "number") throw err;
    let status = null;
    try {
      status = statusDetails(args.protos, err.metadata);
    } catch (decodeError) {
      status = { undecodable: String(decodeError) };
    }
    const report = {
      error: {
        method: err.rpcMethod ?? null,
        code: err.code,
        code_name: grpc.status[err.code] ?? "UNKNOWN",
        details: err.details ?? String(err.message),
        status,
      },
    };
    process.stderr.write(`${JSON.stringify(report, null, 2)}\n`);
    process.exitCode = EXIT_RPC;
  } finally {
    workflows.close();
    contacts.close();
  }
}

main().catch((err) => {
  process.stderr.write(`client.js: ${err?.stack ?? err}\n`);
  process.exit(EXIT_RPC);
});

'use strict';
// A grpc-js reflection client (tests/rest/test_reflection.py runs it): over ONE stream
// kept open, it asks for the list of services, then for the file of each, one question
// at a time, each sent only once the previous one is answered. Prints one JSON document:
// {"services": [...], "files": {"<service>": ["<base64 FileDescriptorProto>", ...]},
//  "errors": {"<service>": "<error message>"}}.
//
// Usage: node grpc_js_reflection.js <reflection.binpb> <host:port> <v1|v1alpha>
// where reflection.binpb is a FileDescriptorSet holding the reflection service's file.

const fs = require('fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [setPath, address, version] = process.argv.slice(2);
const definition = protoLoader.loadFileDescriptorSetFromBuffer(fs.readFileSync(setPath), {
  keepCase: true,
  oneofs: true,
});
const loaded = grpc.loadPackageDefinition(definition);
const Reflection = loaded.grpc.reflection[version].ServerReflection;
const client = new Reflection(address, grpc.credentials.createInsecure());
const call = client.ServerReflectionInfo({ deadline: Date.now() + 15000 });

const out = { services: [], files: {}, errors: {} };
let pending = [];
let asking = null;

function askNext() {
  asking = pending.shift();
  if (asking === undefined) {
    call.end();
    return;
  }
  call.write({ file_containing_symbol: asking });
}

call.on('data', (answer) => {
  if (answer.message_response === 'list_services_response') {
    out.services = answer.list_services_response.service.map((s) => s.name);
    pending = [...out.services];
  } else if (answer.message_response === 'file_descriptor_response') {
    out.files[asking] = answer.file_descriptor_response.file_descriptor_proto.map((b) =>
      Buffer.from(b).toString('base64'),
    );
  } else if (answer.message_response === 'error_response') {
    out.errors[asking] = answer.error_response.error_message;
  }
  askNext();
});
call.on('error', (err) => {
  process.stderr.write(`reflection failed: ${err.code} ${err.details}\n`);
  process.exit(1);
});
call.on('end', () => {
  process.stdout.write(JSON.stringify(out));
  client.close();
});
call.write({ list_services: '' });

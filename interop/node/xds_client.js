// A stock @grpc/grpc-js-xds client driven line by line by server/tests/xds_interop.rs.
//
// Environment: GRPC_XDS_BOOTSTRAP points at the bootstrap file naming dlbd's ADS address.
// Argument: the target, e.g. xds:///s. Same line protocol as interop/python/xds_client.py:
//   calls N [KEY]  -> {"ok": {backend_id: count}, "errors": {code: count}}
//   quit
'use strict';

const grpc = require('@grpc/grpc-js');
const xds = require('@grpc/grpc-js-xds');
const readline = require('readline');

xds.register();

// google.protobuf.StringValue: field 1 (tag 0x0a), varint length, UTF-8 bytes.
function decodeStringValue(buf) {
  if (buf.length === 0) return '';
  if (buf[0] !== 0x0a) throw new Error('unexpected field in StringValue');
  let len = 0;
  let shift = 0;
  let i = 1;
  for (;;) {
    const b = buf[i++];
    len |= (b & 0x7f) << shift;
    if (b < 0x80) break;
    shift += 7;
  }
  return buf.subarray(i, i + len).toString('utf8');
}

const Client = grpc.makeGenericClientConstructor({
  Who: {
    path: '/dlb.interop.Echo/Who',
    requestStream: false,
    responseStream: false,
    requestSerialize: () => Buffer.alloc(0),
    requestDeserialize: (b) => b,
    responseSerialize: (b) => b,
    responseDeserialize: decodeStringValue,
  },
});

const client = new Client(process.argv[2], grpc.credentials.createInsecure());

function call(key) {
  return new Promise((resolve) => {
    const md = new grpc.Metadata();
    if (key) md.set('dlb-hash-key', key);
    const deadline = new Date(Date.now() + 5000);
    client.Who({}, md, { deadline }, (err, res) => {
      if (err) resolve({ err: grpc.status[err.code] || String(err.code) });
      else resolve({ ok: res });
    });
  });
}

async function main() {
  console.log(JSON.stringify({ ready: require('@grpc/grpc-js/package.json').version }));
  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    const parts = line.trim().split(/\s+/);
    if (parts[0] === '') continue;
    if (parts[0] === 'quit') break;
    if (parts[0] !== 'calls') {
      console.log(JSON.stringify({ error: 'unknown command' }));
      continue;
    }
    const n = parseInt(parts[1], 10);
    const ok = {};
    const errors = {};
    for (let i = 0; i < n; i++) {
      const r = await call(parts[2]);
      if (r.ok !== undefined) ok[r.ok] = (ok[r.ok] || 0) + 1;
      else errors[r.err] = (errors[r.err] || 0) + 1;
    }
    console.log(JSON.stringify({ ok, errors }));
  }
  client.close();
  process.exit(0);
}

main();

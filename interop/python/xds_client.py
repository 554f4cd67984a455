"""A stock grpcio xDS client driven line by line by server/tests/xds_interop.rs.

Environment: GRPC_XDS_BOOTSTRAP points at the bootstrap file naming dlbd's ADS address.
Argument: the target, e.g. xds:///s.

Commands on stdin, one per line; one JSON object per line on stdout:
  calls N [KEY]   N unary calls of /dlb.interop.Echo/Who (with header dlb-hash-key: KEY if
                  given); answers {"ok": {backend_id: count}, "errors": {code: count}}
  quit
Each backend answers with a google.protobuf.StringValue holding its id.
"""

import json
import sys

import grpc

METHOD = "/dlb.interop.Echo/Who"


def decode_string_value(data: bytes) -> str:
    # google.protobuf.StringValue: field 1 (tag 0x0a), varint length, UTF-8 bytes.
    if not data:
        return ""
    if data[0] != 0x0A:
        raise ValueError("unexpected field in StringValue")
    length, shift, i = 0, 0, 1
    while True:
        b = data[i]
        length |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            break
        shift += 7
    return data[i : i + length].decode("utf-8")


def main() -> None:
    target = sys.argv[1]
    channel = grpc.insecure_channel(target)
    who = channel.unary_unary(
        METHOD,
        request_serializer=lambda _: b"",
        response_deserializer=decode_string_value,
    )
    print(json.dumps({"ready": grpc.__version__}), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "quit":
            break
        if parts[0] != "calls":
            print(json.dumps({"error": "unknown command"}), flush=True)
            continue
        n = int(parts[1])
        metadata = (("dlb-hash-key", parts[2]),) if len(parts) > 2 else None
        ok: dict = {}
        errors: dict = {}
        for _ in range(n):
            try:
                backend = who(None, timeout=5, metadata=metadata)
                ok[backend] = ok.get(backend, 0) + 1
            except grpc.RpcError as e:
                code = e.code().name
                errors[code] = errors.get(code, 0) + 1
        print(json.dumps({"ok": ok, "errors": errors}), flush=True)
    channel.close()


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""A gRPC echo server and client for weft's end-to-end tests (system python3-grpcio).

No protoc: generic handlers carry raw bytes (identity (de)serializers), so a message is
whatever bytes the caller sent.

  echo.py serve --port P --name N
      /weft.test.Echo/Say     unary: answers b"N|" + the request bytes
      /weft.test.Echo/Count   server streaming: the request is a decimal count C (at most
                              1000); answers C messages b"N|1" … b"N|C"
      /weft.test.Echo/Fail    unary: the request is "CODE" or "CODE:message" (CODE a status
                              name such as NOT_FOUND or its number); ends with that status,
                              that message and trailing metadata x-backend=N, x-detail=failed-on-purpose
    Every call gets trailing metadata x-backend=N. Prints "listening on 0.0.0.0:P" once serving.

  echo.py call ADDR --method Say|Count|Fail|/full/Method --data TEXT [--authority A]
                    [--timeout SECS] [--metadata k=v ...]
      Prints one JSON line: {"code": "OK", "code_number": 0, "details": "...",
      "messages": ["..."], "trailing_metadata": {"k": "v"}, "initial_metadata": {...}}.
      Exit 0 when the call ended (whatever the status), 2 when it could not (bad arguments).
"""

import argparse
import json
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "weft.test.Echo"
MAX_COUNT = 1000


def _identity(b):
    return b


def _status_code(text):
    """A grpc.StatusCode from a name (NOT_FOUND) or a number (5)."""
    text = text.strip()
    for code in grpc.StatusCode:
        if text.upper() == code.name or text == str(code.value[0]):
            return code
    raise ValueError(f"unknown status code {text!r}")


def serve(port, name):
    trailer = (("x-backend", name),)
    prefix = name.encode() + b"|"

    def say(request, context):
        context.set_trailing_metadata(trailer)
        return prefix + request

    def count(request, context):
        context.set_trailing_metadata(trailer)
        try:
            n = int(request.decode() or "0")
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "count: not a number")
        for i in range(1, min(n, MAX_COUNT) + 1):
            yield prefix + str(i).encode()

    def fail(request, context):
        code_text, _, message = request.decode().partition(":")
        try:
            code = _status_code(code_text)
        except ValueError as e:
            context.set_trailing_metadata(trailer)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        context.set_trailing_metadata(trailer + (("x-detail", "failed-on-purpose"),))
        context.abort(code, message or f"{code.name} on purpose")

    handlers = {
        "Say": grpc.unary_unary_rpc_method_handler(
            say, request_deserializer=_identity, response_serializer=_identity
        ),
        "Count": grpc.unary_stream_rpc_method_handler(
            count, request_deserializer=_identity, response_serializer=_identity
        ),
        "Fail": grpc.unary_unary_rpc_method_handler(
            fail, request_deserializer=_identity, response_serializer=_identity
        ),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if server.add_insecure_port(f"0.0.0.0:{port}") == 0:
        print(f"cannot listen on port {port}", file=sys.stderr)
        return 1
    server.start()
    print(f"listening on 0.0.0.0:{port}", flush=True)
    threading.Event().wait()
    return 0


def call(addr, method, data, authority, timeout, metadata):
    path = method if method.startswith("/") else f"/{SERVICE}/{method}"
    # Straight to ADDR: never through a proxy named in the environment.
    options = [("grpc.enable_http_proxy", 0)]
    if authority:
        options.append(("grpc.default_authority", authority))
    out = {"messages": []}
    with grpc.insecure_channel(addr, options=options) as channel:
        streaming = path.endswith("/Count")
        make = channel.unary_stream if streaming else channel.unary_unary
        stub = make(path, request_serializer=_identity, response_deserializer=_identity)
        try:
            if streaming:
                it = stub(data.encode(), timeout=timeout, metadata=metadata)
                for m in it:
                    out["messages"].append(m.decode(errors="replace"))
                result = it
            else:
                reply, result = stub.with_call(data.encode(), timeout=timeout, metadata=metadata)
                out["messages"].append(reply.decode(errors="replace"))
        except grpc.RpcError as e:
            result = e
        code = result.code()
        out["code"] = code.name
        out["code_number"] = code.value[0]
        out["details"] = result.details() or ""
        out["initial_metadata"] = {k: str(v) for k, v in (result.initial_metadata() or ())}
        out["trailing_metadata"] = {k: str(v) for k, v in (result.trailing_metadata() or ())}
    print(json.dumps(out, sort_keys=True), flush=True)
    return 0


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", required=True)
    c = sub.add_parser("call")
    c.add_argument("addr")
    c.add_argument("--method", default="Say")
    c.add_argument("--data", default="")
    c.add_argument("--authority")
    c.add_argument("--timeout", type=float, default=5.0)
    c.add_argument("--metadata", action="append", default=[], help="k=v, repeatable")
    a = p.parse_args(argv)
    if a.cmd == "serve":
        return serve(a.port, a.name)
    metadata = []
    for kv in a.metadata:
        k, sep, v = kv.partition("=")
        if not sep:
            p.error(f"--metadata {kv!r}: expected k=v")
        metadata.append((k.lower(), v))
    return call(a.addr, a.method, a.data, a.authority, a.timeout, metadata)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

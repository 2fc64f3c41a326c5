"""A do-nothing ext_proc server: the baseline that bench/extproc_overhead.py compares switchyard to.

    python bench/noop_processor.py --listen 127.0.0.1:50052 [--backend small]

It answers every message at once; on the buffered request body it sets
``x-switchyard-backend`` and ``clear_route_cache``, as switchyard does, without parsing the
body, and ends the stream after that last answer, as switchyard does. gRPC health
(service "") answers SERVING once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio


class NoopProcessor(ext_grpc.ExternalProcessorServicer):
    def __init__(self, backend: str) -> None:
        route = ext.CommonResponse(clear_route_cache=True)
        route.header_mutation.set_headers.append(base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="x-switchyard-backend", raw_value=backend.encode()),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        ))
        self._answers = {
            "request_headers": ext.ProcessingResponse(request_headers=ext.HeadersResponse()),
            "request_body": ext.ProcessingResponse(request_body=ext.BodyResponse(response=route)),
            "response_headers": ext.ProcessingResponse(response_headers=ext.HeadersResponse()),
            "response_body": ext.ProcessingResponse(response_body=ext.BodyResponse()),
        }

    async def Process(self, request_iterator, context):
        async for message in request_iterator:
            phase = message.WhichOneof("request")
            yield self._answers[phase]
            if phase == "request_body" or (phase == "request_headers" and message.request_headers.end_of_stream):
                return  # the last answer the request needs: end the stream, as switchyard does


async def serve(listen: str, backend: str) -> None:
    server = grpc.aio.server()
    ext_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(backend), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(listen)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"noop processor: serving on {listen}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:50052")
    parser.add_argument("--backend", default="small", help="Value of x-switchyard-backend to set.")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, args.backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())

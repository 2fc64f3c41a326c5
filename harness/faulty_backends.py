"""OpenAI-like stub backends that fail on demand, for the failover tests and bench.

    python -m harness.faulty_backends --control PORT NAME=PORT [NAME=PORT ...]

One asyncio process serves every named backend (raw HTTP/1.1, so it can reset, stall or cut a
stream mid-way) and a control port:

    POST /mode/<name>/<mode>   set a backend's behaviour (below); ``refuse`` closes its listener
    GET  /log                  what each backend received, one JSON object per request
    POST /clear                empty the log

Modes: ``ok`` (a JSON completion naming the backend and the model it received), ``sse`` (3
events then ``[DONE]``), ``sse_cut`` (2 events, then a reset: no terminator), ``s503``, ``s429``,
``reset`` (RST without answering), ``stall`` (read the request, never answer), ``refuse``
(connections refused), ``p503-<percent>`` (503 for that share of requests, chosen at random;
else ``ok``). A request is logged once fully read, whatever the mode: its backend, ``model``,
credential headers, ``x-switchyard-*`` header names, ``host`` and body size. Prompts are not kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import struct
import sys

__all__ = ["main"]

HOST = "127.0.0.1"
CREDENTIALS = ("authorization", "api-key", "x-api-key")


class Backends:
    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports
        self.modes = {name: "ok" for name in ports}
        self.servers: dict[str, asyncio.AbstractServer] = {}
        self.conns: dict[str, set[asyncio.StreamWriter]] = {name: set() for name in ports}
        self.seen: list[dict] = []

    async def start(self, name: str) -> None:
        if name not in self.servers:
            self.servers[name] = await asyncio.start_server(
                lambda r, w, n=name: self.serve(n, r, w), HOST, self.ports[name], reuse_address=True)

    async def stop(self, name: str) -> None:
        server = self.servers.pop(name, None)
        if server is not None:
            server.close()
        for writer in list(self.conns[name]):  # pooled keep-alive connections go too: a dead backend
            writer.transport.abort()
        self.conns[name].clear()

    async def serve(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns[name].add(writer)
        try:
            while (request := await _read(reader)) is not None:
                headers, body = request
                if not await self.answer(name, headers, body, writer):
                    return
        finally:
            self.conns[name].discard(writer)
            writer.close()

    async def answer(self, name: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; ``False``: the connection is gone."""
        try:
            model = json.loads(body).get("model") if body else None
        except ValueError:
            model = f"<unparsable body of {len(body)} bytes>"
        mode = self.modes[name]
        self.seen.append({"backend": name, "mode": mode, "model": model, "bytes": len(body), "host": headers.get("host"),
                          **{h: headers.get(h) for h in CREDENTIALS},
                          "switchyard": sorted(k for k in headers if k.startswith("x-switchyard-"))})
        if mode.startswith("p503-"):
            mode = "s503" if random.random() * 100 < float(mode[5:]) else "ok"
        if mode == "ok":
            writer.write(_response(200, json.dumps({"backend": name, "model": model, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}).encode()))
        elif mode in ("s503", "s429"):
            writer.write(_response(int(mode[1:]), json.dumps({"error": {"message": f"{name} says {mode[1:]}"}}).encode()))
        elif mode == "reset":
            _reset(writer)
            return False
        elif mode == "stall":
            await asyncio.sleep(3600)
            return False
        elif mode in ("sse", "sse_cut"):
            return await _sse(writer, name, model, cut=mode == "sse_cut")
        await writer.drain()
        return True

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode("latin-1").split(" ")
        await reader.readuntil(b"\r\n\r\n")
        method, parts = line[0], line[1].strip("/").split("/")
        out = b"{}"
        if method == "POST" and parts[0] == "mode" and parts[1] in self.modes:
            self.modes[parts[1]] = parts[2]
            await (self.stop(parts[1]) if parts[2] == "refuse" else self.start(parts[1]))
        elif method == "POST" and parts[0] == "clear":
            self.seen.clear()
        elif parts[0] == "log":
            out = json.dumps(self.seen).encode()
        writer.write(_response(200, out, close=True))
        await writer.drain()
        writer.close()


async def _read(reader: asyncio.StreamReader) -> tuple[dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    return headers, body


def _response(status: int, body: bytes, close: bool = False) -> bytes:
    extra = "connection: close\r\n" if close else ""
    return (f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
            ).encode() + body


def _reset(writer: asyncio.StreamWriter) -> None:
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _sse(writer: asyncio.StreamWriter, name: str, model: object, cut: bool) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    for i in range(2 if cut else 3):
        event = b"data: " + json.dumps({"backend": name, "model": model, "chunk": i}).encode() + b"\n\n"
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        await asyncio.sleep(0.1)
    if cut:
        _reset(writer)
        return False
    done = b"data: [DONE]\n\n"
    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
    await writer.drain()
    return True


async def _main(control: int, ports: dict[str, int]) -> None:
    backends = Backends(ports)
    for name in ports:
        await backends.start(name)
    server = await asyncio.start_server(backends.control, HOST, control, reuse_address=True)
    print("faulty backends ready", file=sys.stderr, flush=True)
    await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("backends", nargs="+", metavar="NAME=PORT")
    args = parser.parse_args(argv)
    ports = {name: int(port) for name, port in (item.split("=", 1) for item in args.backends)}
    asyncio.run(_main(args.control, ports))


if __name__ == "__main__":
    main()

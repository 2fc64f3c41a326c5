"""A tiny authoritative DNS server on a loopback UDP port, for resolver tests without a network.

gRPC's default (c-ares) resolver takes the DNS server to ask from the target's authority:
``dns://127.0.0.1:<port>/scorer.test:50061`` asks :class:`DnsServer` at that port. It answers
A queries for its names with every address it was given, any other query type for those names
with an empty NOERROR (so the resolver's AAAA lookup ends at once instead of timing out), and
every other name with NXDOMAIN. It runs on the test's event loop (the resolver runs on gRPC's
own threads) and records every question it was asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import cast

__all__ = ["TYPE_A", "TYPE_AAAA", "DnsServer", "dns_server"]

TYPE_A, TYPE_AAAA = 1, 28
_CLASS_IN = 1
_QR, _AA, _RD, _RA = 0x8000, 0x0400, 0x0100, 0x0080
_NXDOMAIN = 3


class DnsServer(asyncio.DatagramProtocol):
    """Answers ``records`` (lower-case name -> IPv4 addresses); ``queries``: (name, type) asked."""

    def __init__(self, records: Mapping[str, Sequence[str]]) -> None:
        self.records = {name.lower().rstrip("."): tuple(addresses) for name, addresses in records.items()}
        self.queries: list[tuple[str, int]] = []
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython's selector transport does not subclass DatagramTransport, though it is one
        self._transport = cast(asyncio.DatagramTransport, transport)
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        answer = self.answer(data)
        if answer is not None and self._transport is not None:
            self._transport.sendto(answer, addr)

    def answer(self, query: bytes) -> bytes | None:
        """The response to one query message; None for anything that is not a one-question query."""
        try:
            ident, flags, questions = struct.unpack_from("!HHH", query)
            if flags & _QR or questions != 1:
                return None
            labels, at = [], 12
            while query[at]:  # a question's name is plain labels (no compression)
                labels.append(query[at + 1:at + 1 + query[at]].decode("ascii"))
                at += 1 + query[at]
            qtype, qclass = struct.unpack_from("!HH", query, at + 1)
        except (struct.error, IndexError, UnicodeDecodeError):
            return None
        question_end = at + 5
        name = ".".join(labels).lower()
        self.queries.append((name, qtype))
        addresses = self.records.get(name)
        records = b""
        if addresses is not None and qtype == TYPE_A and qclass == _CLASS_IN:
            for address in addresses:  # name: a pointer to the question's (offset 12); TTL 0
                records += b"\xc0\x0c" + struct.pack("!HHIH", TYPE_A, _CLASS_IN, 0, 4) + socket.inet_aton(address)
        count = len(addresses) if records else 0
        rcode = _NXDOMAIN if addresses is None else 0
        header = struct.pack("!HHHHHH", ident, _QR | _AA | _RA | (flags & _RD) | rcode, 1, count, 0, 0)
        return header + query[12:question_end] + records


@contextlib.asynccontextmanager
async def dns_server(records: Mapping[str, Sequence[str]], host: str = "127.0.0.1") -> AsyncIterator[DnsServer]:
    """A :class:`DnsServer` for ``records`` on a free UDP port of ``host`` (its ``port``)."""
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(lambda: DnsServer(records), local_addr=(host, 0))
    try:
        yield server
    finally:
        transport.close()

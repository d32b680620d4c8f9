"""A backend over a real socket that follows a script, for tests of forwards done with
callbacks (``balancer/direct.py``): answers, drops, hangs, 503s, garbage."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

HEALTH = json.dumps(
    {"status": "ok", "capacity": 1, "in_flight": 0, "available": 1, "models": ["m.gguf"]}
).encode()
#: What a broken server sends with no request outstanding (``trailing``, ``late``).
UNASKED = (
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
    b'content-length: 17\r\n\r\n{"error": "late"}'
)
#: An interim response (RFC 9110 15.2): a server may send any number before the answer.
HINTS = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
BUSY = (
    b'{"error": {"message": "full", "type": "server_error", "param": null, "code": "queue_full"}}'
)


def answer_of(name: str) -> bytes:
    """What backend ``name`` answers: one completion token."""
    usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    return json.dumps({"response": name, "model": "m.gguf", "usage": usage}).encode()


def _response(status: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    return head % (status, len(body)) + body


@dataclass
class Backend:
    """A backend over a real socket; each generation request takes the next action of
    ``script`` (then "ok"): ok, drop (close without a byte), hang (say nothing), busy (503),
    garbage (bytes that are not HTTP), slow (answer once ``release`` is set), split (the
    head, then the body in a later write, as uvicorn writes them), head-drop (the head of a
    200, then close), trailing (the answer and, in the same write, an unasked-for second
    response, as a broken server might send), late (the answer, then that second response
    a little later, while the connection is idle), hints (a 103 Early Hints interim
    response, then the answer in a later write), upgrade (a 101 no request asked for)."""

    name: str
    script: list[str] = field(default_factory=list)
    url: str = ""
    connections: int = 0  # that carried a generation request (health probes have their own)
    generations: int = 0
    health_hangs: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)
    drop_reused: bool = False  # close a kept-alive connection when its second request comes
    #: Close a kept-alive connection when its second /health probe comes, as a server does
    #: whose keep-alive timeout ends as the probe is written.
    health_drops_reused: bool = False
    probes: int = 0  # /health requests answered

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = probed = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if head.startswith(b"GET /health"):
                    if self.health_hangs:
                        await reader.read()
                        return
                    probed += 1
                    if self.health_drops_reused and probed == 2:
                        return
                    self.probes += 1
                    writer.write(_response(b"200 OK", HEALTH))
                    await writer.drain()
                    continue
                served += 1
                if served == 1:
                    self.connections += 1
                if self.drop_reused and served == 2:
                    return
                self.generations += 1
                action = self.script.pop(0) if self.script else "ok"
                if action == "drop":
                    return
                if action == "hang":
                    await reader.read()  # until the client hangs up
                    self.closed_by_client.set()
                    return
                if action == "slow":
                    await self.release.wait()
                if action in ("split", "head-drop"):
                    whole = _response(b"200 OK", answer_of(self.name))
                    cut = whole.index(b"\r\n\r\n") + 4
                    writer.write(whole[:cut])
                    await writer.drain()
                    if action == "head-drop":
                        return
                    await asyncio.sleep(0.05)  # the head is read on its own
                    writer.write(whole[cut:])
                elif action == "upgrade":
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n")
                    writer.write(b"connection: upgrade\r\n\r\n")
                elif action == "garbage":
                    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
                elif action == "trailing":
                    writer.write(_response(b"200 OK", answer_of(self.name)) + UNASKED)
                elif action == "hints":
                    writer.write(HINTS)
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(_response(b"200 OK", answer_of(self.name)))
                elif action == "late":
                    writer.write(_response(b"200 OK", answer_of(self.name)))
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(UNASKED)
                elif action == "busy":
                    writer.write(_response(b"503 Service Unavailable", BUSY))
                else:
                    writer.write(_response(b"200 OK", answer_of(self.name)))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
        finally:
            writer.close()

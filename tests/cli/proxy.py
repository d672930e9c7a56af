"""A TCP proxy in front of a real server, to lose, hold and cut its answers in tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import NamedTuple

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what an HTTP/2 client sends first
SETTINGS, PING, GOAWAY = 0x4, 0x6, 0x7  # HTTP/2 frame types
ACK = 0x1  # the flag of a PING frame that answers one
ENHANCE_YOUR_CALM = 0xB  # the HTTP/2 error code of a GOAWAY for too many pings


class Frame(NamedTuple):
    """An HTTP/2 frame the proxy forwarded: ``up`` (client to server) or ``down``, its
    type and flags, and its payload (PING and GOAWAY frames only; empty otherwise)."""
    direction: str
    type: int
    flags: int
    payload: bytes


class _Frames:
    """Splits one direction of a plaintext HTTP/2 connection into frames; anything else
    (TLS) is left alone."""

    def __init__(self, direction: str) -> None:
        self.direction = direction
        self._head = PREFACE if direction == "up" else b""
        self._buf = bytearray()
        self._off = False  # not plaintext HTTP/2: no frames
        self._first = True

    def feed(self, data: bytes) -> list[Frame]:
        if self._off:
            return []
        self._buf += data
        if self._head:
            n = min(len(self._head), len(self._buf))
            if bytes(self._buf[:n]) != self._head[:n]:
                self._off = True
                self._buf.clear()
                return []
            del self._buf[:n]
            self._head = self._head[n:]
        frames, at = [], 0
        while len(self._buf) - at >= 9:
            if self._first and self._buf[at + 3] != SETTINGS:  # every peer starts with one
                self._off = True
                self._buf.clear()
                return []
            self._first = False
            length = int.from_bytes(self._buf[at:at + 3], "big")
            if len(self._buf) - at < 9 + length:
                break
            kind, flags = self._buf[at + 3], self._buf[at + 4]
            payload = bytes(self._buf[at + 9:at + 9 + length]) if kind in (PING, GOAWAY) \
                else b""
            frames.append(Frame(self.direction, kind, flags, payload))
            at += 9 + length
        del self._buf[:at]
        return frames


class Proxy:
    """Forwards 127.0.0.1:``port`` (its own, ephemeral) to 127.0.0.1:``upstream``, on an
    event loop in its own thread. ``hold()`` keeps the server's bytes from reaching the
    clients (what clients send still goes through) until ``release()``; ``freeze()``
    stops forwarding both ways, the connections left open (a network that drops every
    packet), until ``release()``; ``cut()`` breaks every live connection (new ones are
    accepted and forwarded as usual). ``frames``: the HTTP/2 frames forwarded, in
    order (plaintext gRPC only), to see the pings and GOAWAYs that pass."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self.frames: list[Frame] = []
        self._held = threading.Event()
        self._frozen = threading.Event()
        self._conns: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the proxy did not start")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            cw.close()
            return
        self._conns.append((cw, sw))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, down: bool) -> None:
            frames = _Frames("down" if down else "up")
            try:
                while data := await r.read(65536):
                    while (down and self._held.is_set()) or self._frozen.is_set():
                        if w.is_closing():
                            return
                        await asyncio.sleep(0.01)
                    self.frames.extend(frames.feed(data))
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(cr, sw, False), pipe(sr, cw, True))

    def hold(self) -> None:
        self._held.set()

    def release(self) -> None:
        """Forward again what ``hold()`` or ``freeze()`` stopped."""
        self._held.clear()
        self._frozen.clear()

    def freeze(self) -> None:
        """Forward nothing either way (the connections stay open) until ``release()``."""
        self._frozen.set()

    def pings(self, direction: str = "up") -> int:
        """PING frames (not their answers) forwarded ``up`` (the client's) or ``down``."""
        return sum(f.direction == direction and f.type == PING and not f.flags & ACK
                   for f in list(self.frames))

    def goaways(self) -> list[tuple[int, bytes]]:
        """The server's GOAWAY frames forwarded: (error code, debug data) each."""
        return [(int.from_bytes(f.payload[4:8], "big"), f.payload[8:])
                for f in list(self.frames) if f.direction == "down" and f.type == GOAWAY]

    def cut(self) -> None:
        """Abort every live connection (both sides) and stop holding or freezing."""
        done = threading.Event()

        def do() -> None:
            for pair in self._conns:
                for w in pair:
                    with contextlib.suppress(Exception):
                        w.transport.abort()
            self._conns.clear()
            self._held.clear()
            self._frozen.clear()
            done.set()

        self._loop.call_soon_threadsafe(do)
        done.wait(5)

    def close(self) -> None:
        self.cut()

        async def stop() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

"""A TCP proxy in front of a real server, to lose, hold and cut its answers in tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading


class Proxy:
    """Forwards 127.0.0.1:``port`` (its own, ephemeral) to 127.0.0.1:``upstream``, on an
    event loop in its own thread. ``hold()`` keeps the server's bytes from reaching the
    clients (what clients send still goes through) until ``release()``; ``cut()`` breaks
    every live connection (new ones are accepted and forwarded as usual)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self._held = threading.Event()
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
            try:
                while data := await r.read(65536):
                    while down and self._held.is_set():
                        if w.is_closing():
                            return
                        await asyncio.sleep(0.01)
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
        self._held.clear()

    def cut(self) -> None:
        """Abort every live connection (both sides) and stop holding."""
        done = threading.Event()

        def do() -> None:
            for pair in self._conns:
                for w in pair:
                    with contextlib.suppress(Exception):
                        w.transport.abort()
            self._conns.clear()
            self._held.clear()
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

"""Open-loop real-time streams: the load a fleet of live microphones puts on a server.

Each stream opens a session and sends one chunk per ``chunk_s`` on a fixed schedule
(chunk k is due at start + k * chunk_s), whatever the answers do; after
``session_chunks`` chunks it ends the session (last chunk ``end=True``) and opens a
new one on the next tick. A session holds one chunk in flight (the server's rule),
so a chunk whose predecessor is answered late goes out late; its latency is
measured from when it was due, not from when it went out, so a slow server cannot
hide its queue from the figures (no coordinated omission).

``closed_loop=True`` instead sends each chunk as soon as the previous one is
answered (saturation), latency from the send.

    result = asyncio.run(realtime_streams("127.0.0.1:8001", "speech", chunk_fn,
                                          streams=32, chunk_s=0.04, duration_s=30))
    result.percentile(99)

``run_load`` spreads the streams over several processes (a Python client process
saturates one core long before a server does) and reports how busy they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from rnnserve.client.client import (
    OWN_CONNECTION,
    AsyncClient,
    Data,
    add_many_item,
    item_status,
    new_session_id,
    packed_request,
)
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

OVERRUN_S = 2.0  # how long past the window a stream still sends the chunks it owes
CHUNK_TIMEOUT_S = 30.0  # a chunk not answered by then counts as DEADLINE_EXCEEDED


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, answered chunks
    times: list[float] = field(default_factory=list)  # when each was due, from the start
    errors: Counter[str] = field(default_factory=Counter)  # status code name -> chunks
    sessions: int = 0
    late: int = 0  # chunks sent more than one chunk duration after they were due
    unsent: int = 0  # chunks due in the window but still unsent when it overran (below)
    started: float = 0.0  # wall clock (time.time()) of the first chunk's due time
    # the same for the load process that started last (after the shared start time when
    # it connected late): the processes overlapped for the duration less the difference
    latest_start: float = 0.0
    ended: float = 0.0
    busy: float = 0.0  # the busiest load process's CPU time / wall time (0..1)
    # streams per server worker process (serve --workers), by the worker's index
    workers: Counter[int] = field(default_factory=Counter)

    @property
    def answered(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def merge(self, other: LoadResult) -> None:
        # each part's times count from its own start: from the earliest once merged
        origin = min((t for t in (self.started, other.started) if t), default=0.0)
        if self.started and self.started != origin:
            self.times = [t + self.started - origin for t in self.times]
        shift = other.started - origin if other.started else 0.0
        self.latencies += other.latencies
        self.times += [t + shift for t in other.times] if shift else other.times
        self.errors.update(other.errors)
        self.sessions += other.sessions
        self.late += other.late
        self.unsent += other.unsent
        self.started = origin
        self.latest_start = max(self.latest_start, other.latest_start)
        self.ended = max(self.ended, other.ended)
        self.busy = max(self.busy, other.busy)
        self.workers.update(other.workers)


async def _tick(t0: float, k: int, chunk_s: float, until: float, closed_loop: bool,
                result: LoadResult, n: int = 1) -> float | None:
    """Wait for tick ``k`` (now, in closed loop) and return when it was due, counting
    ``n`` late chunks when it is late; None when the window is over."""
    loop = asyncio.get_running_loop()
    due = loop.time() if closed_loop else t0 + k * chunk_s
    if due >= until:
        return None
    if not closed_loop and loop.time() > until + OVERRUN_S:
        # far behind: give up the rest of the window instead of waiting out a backlog
        # that may take minutes (the level is over capacity)
        result.unsent += n * (int((until - due) // chunk_s) + 1)
        return None
    wait = due - loop.time()
    if wait > 0:
        await asyncio.sleep(wait)
    elif -wait > chunk_s and not closed_loop:
        result.late += n
    return due


class _Closer:
    """Closes the sessions a stream leaves without their end chunk (the window ended in
    closed loop or after an overrun, a chunk failed), so that they do not stay live on
    the server until its idle timeout and weigh on what runs next. The closes go out
    once the run's window is over: they are no part of what it measures."""

    def __init__(self) -> None:
        self._left: list[tuple[AsyncClient, str]] = []

    def close(self, client: AsyncClient, session_id: str) -> None:
        self._left.append((client, session_id))

    async def wait(self) -> None:
        async def close(client: AsyncClient, session_id: str) -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):  # gone already, or unreachable
                await client.close_session(session_id)

        left, self._left = self._left, []
        await asyncio.gather(*(close(c, sid) for c, sid in left))


def _failure(exc: BaseException) -> str:
    """The status a failed chunk counts under."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    return "DEADLINE_EXCEEDED" if isinstance(exc, TimeoutError) else "UNAVAILABLE"


async def _one_stream(client: AsyncClient, model: str, version: int,
                      chunk: Callable[[int], Data], chunk_s: float, t0: float, until: float,
                      session_chunks: int, pcm16: bool, result: LoadResult, origin: float,
                      closed_loop: bool, closer: _Closer) -> None:
    k = 0
    loop = asyncio.get_running_loop()
    if t0 > loop.time():
        await asyncio.sleep(t0 - loop.time())
    while (loop.time() if closed_loop else t0 + k * chunk_s) < until:
        s = client.stream(model, version, pcm16=pcm16)
        ended = False
        try:
            async with s:
                result.sessions += 1
                for i in range(session_chunks):
                    due = await _tick(t0, k, chunk_s, until, closed_loop, result)
                    if due is None:
                        return
                    k += 1
                    last = i == session_chunks - 1 or (
                        not closed_loop and due + chunk_s >= until)
                    await s.send(chunk(k), end=last)
                    result.latencies.append(loop.time() - due)
                    result.times.append(due - origin)
                    if last:
                        ended = True
                        break
        except (grpc.aio.AioRpcError, ConnectionError) as exc:
            result.errors[_failure(exc)] += 1
            if not s.session_id:
                # the open failed: it takes the slot of the chunk it would have sent,
                # and the next open waits for the next tick (not a storm of refusals)
                k += 1
                await asyncio.sleep(max(0.0, chunk_s if closed_loop
                                        else t0 + k * chunk_s - loop.time()))
        finally:
            if s.session_id and not ended:
                closer.close(client, s.session_id)


async def _send_many(m: Any, model: str, version: int, sids: list[str], seqs: list[int],
                     data: Data, opens: list[int], ends: set[int], pcm16: bool
                     ) -> dict[int, str]:
    """One tick's ``StreamMany`` request: every stream's chunk as an item (those in
    ``opens`` opening their session); the failed items' status names by position."""
    request, first = pb.ManyRequest(), set(opens)
    for i, (sid, seq) in enumerate(zip(sids, seqs, strict=True)):
        add_many_item(request, sid, seq, data, i in ends, pcm16=pcm16,
                      open_model=model if i in first else "", version=version)
    answers = await m.send(request)
    return {i: item_status(r).name for i, r in enumerate(answers) if r.code}


async def _send_packed(p: Any, model: str, version: int, sids: list[str], seqs: list[int],
                       data: Data, opens: list[int], ends: set[int], pcm16: bool
                       ) -> dict[int, str]:
    """``_send_many`` as one ``StreamPacked`` request, the chunks in one array."""
    a = _as_array(data, pcm16)
    answer = await p.send(packed_request(model, sids, seqs,
                                         np.broadcast_to(a, (len(sids), *a.shape)),
                                         version=version, opens=opens, ends=sorted(ends)))
    return {i: code.name for i, (code, _, _) in answer.failures.items()}


def _as_array(data: Data, pcm16: bool) -> np.ndarray:
    """A chunk as the model's input array (PCM16 samples, text bytes, or as given)."""
    if isinstance(data, str):
        return np.frombuffer(data.encode(), dtype=np.uint8)
    if isinstance(data, bytes | bytearray | memoryview):
        return np.frombuffer(data, dtype="<i2" if pcm16 else np.uint8)
    return np.asarray(data)


async def _many_streams(client: AsyncClient, model: str, version: int,
                        chunk: Callable[[int], Data], chunk_s: float, t0: float,
                        until: float, session_chunks: int, pcm16: bool, result: LoadResult,
                        origin: float, closed_loop: bool, n: int, closer: _Closer,
                        packed: bool = False) -> None:
    """``n`` streams in step on one ``StreamMany`` stream (``packed``: ``StreamPacked``,
    the chunks in one array), as a gateway sends them: one request per tick with the
    chunk of each, a new session opened in the request of its first chunk."""
    k = 0
    loop = asyncio.get_running_loop()
    if t0 > loop.time():
        await asyncio.sleep(t0 - loop.time())
    sids = [""] * n
    seqs = [0] * n
    send = _send_packed if packed else _send_many

    def close(i: int) -> None:
        if seqs[i]:  # a session that failed opening is none (the server ends it): no
            closer.close(client, sids[i])  # extra call while overloaded
        seqs[i] = 0  # a new session on the next tick

    try:
        while (loop.time() if closed_loop else t0 + k * chunk_s) < until:
            try:
                async with (client.packed() if packed else client.many()) as m:
                    while True:
                        due = await _tick(t0, k, chunk_s, until, closed_loop, result, n)
                        if due is None:
                            return
                        k += 1
                        last_tick = not closed_loop and due + chunk_s >= until
                        opens = [i for i in range(n) if seqs[i] == 0]
                        for i in opens:
                            sids[i] = new_session_id()
                        ends = {i for i in range(n)
                                if last_tick or seqs[i] == session_chunks - 1}
                        # every stream's chunk of this tick
                        failed = await send(m, model, version, sids, seqs, chunk(k), opens,
                                            ends, pcm16)
                        latency = loop.time() - due
                        for i in range(n):
                            if i in failed:
                                result.errors[failed[i]] += 1
                                close(i)
                                continue
                            result.sessions += seqs[i] == 0
                            result.latencies.append(latency)
                            result.times.append(due - origin)
                            seqs[i] = 0 if i in ends else seqs[i] + 1
                        if last_tick:
                            return
            except (grpc.aio.AioRpcError, ConnectionError) as exc:
                # the stream failed, a request was refused whole or not answered in
                # time: its chunks count as errors, its sessions are closed and new ones
                # open
                result.errors[_failure(exc)] += n
                for i in range(n):
                    close(i)
                if closed_loop:  # no tick to wait for: not a storm of failing requests
                    await asyncio.sleep(chunk_s)
    finally:
        for i in range(n):
            close(i)  # those open without their end chunk when the window ended


async def realtime_streams(target: str, model: str, chunk: Callable[[int], Data], *,
                           streams: int, chunk_s: float, duration_s: float,
                           session_chunks: int = 250, pcm16: bool = False,
                           timeout: float = CHUNK_TIMEOUT_S, closed_loop: bool = False,
                           start_at: float | None = None,
                           phases: list[float] | None = None,
                           connections: int = 1, many: int = 0, version: int = 0,
                           spread: bool = True, offset: int = 0,
                           packed: bool = False) -> LoadResult:
    """Run ``streams`` real-time streams for ``duration_s``; ``chunk(k)`` gives chunk k.
    Each stream opens ``model`` at ``version`` (0: the highest).

    ``start_at``: wall-clock time (time.time()) of the start, to line up several
    processes; ``phases``: each stream's offset in seconds (default: spread evenly
    over one chunk duration); ``connections``: gRPC connections the streams take turns
    on (several let the kernel spread them over a server's worker processes);
    ``many`` > 1: the streams go in groups of that many per ``StreamMany`` stream (each
    group at the phase of its first), as a gateway would send them (``packed``: on a
    ``StreamPacked`` stream, the group's chunks in one array); ``timeout``: the
    longest wait for one chunk's answer (not a session's), past which the chunk counts
    as ``DEADLINE_EXCEEDED`` and its session is closed. ``spread``: several connections
    are spread evenly over the server's worker processes (``AsyncClient.open_spread``),
    else the kernel places them; the streams (or groups) take the connections in turn
    from ``offset``, so that processes given consecutive offsets take the workers in
    turn together.
    """
    result = LoadResult()
    loop = asyncio.get_running_loop()
    options = OWN_CONNECTION if connections > 1 else None
    async with contextlib.AsyncExitStack() as stack:
        count = 1  # the server's worker processes
        if connections > 1 and spread:
            placed = await AsyncClient.open_spread(target, connections, timeout=timeout)
            for client, _ in placed:
                stack.push_async_callback(client.close)
            count = ((await placed[0][0].worker()) or (0, 1))[1]
        else:
            placed = []
            for _ in range(connections):
                client = await stack.enter_async_context(
                    AsyncClient(target, timeout=timeout, options=options))
                where = await client.worker() or (0, 1)  # connects before the clock starts
                placed.append((client, where[0]))
                count = max(count, where[1])
        clients = [c for c, _ in placed]
        result.workers.update({i: 0 for i in range(count)})  # a worker given none counts
        wall = time.time()
        start_wall = max(start_at or wall + 0.05, wall)
        start = loop.time() + (start_wall - wall)
        until = start + duration_s
        result.started = result.latest_start = start_wall
        if phases is None:
            phases = [i * chunk_s / streams for i in range(streams)]
        await asyncio.sleep(max(0.0, start - loop.time()))
        cpu0, wall0 = time.process_time(), time.time()
        closer = _Closer()
        if many > 1:
            groups = [phases[g:g + many] for g in range(0, len(phases), many)]
            for i, group in enumerate(groups):
                result.workers[placed[(i + offset) % connections][1]] += len(group)
            await asyncio.gather(*(
                _many_streams(clients[(i + offset) % connections], model, version, chunk,
                              chunk_s, start + group[0], until, session_chunks, pcm16,
                              result, start, closed_loop, len(group), closer, packed)
                for i, group in enumerate(groups)))
        else:
            for i in range(len(phases)):
                result.workers[placed[(i + offset) % connections][1]] += 1
            await asyncio.gather(*(
                _one_stream(clients[(i + offset) % connections], model, version, chunk,
                            chunk_s,
                            start + phase, until, session_chunks, pcm16, result, start,
                            closed_loop, closer)
                for i, phase in enumerate(phases)))
        result.ended, cpu1 = time.time(), time.process_time()
        await closer.wait()
    result.busy = (cpu1 - cpu0) / max(1e-9, result.ended - wall0)
    return result


@dataclass(frozen=True)
class LoadJob:
    """One process's share of a load run (picklable: crosses to a worker process)."""

    target: str
    model: str
    meta: bytes  # serialized ModelMetadata: the worker builds its own chunks from it
    chunk_ms: int
    chunk_bytes: int
    phases: tuple[float, ...]
    duration_s: float
    start_at: float
    closed_loop: bool
    session_chunks: int
    connections: int
    many: int
    spread: bool = True
    offset: int = 0  # streams (groups) of the processes before this one
    packed: bool = False


def _work(job: LoadJob) -> LoadResult:
    from rnnserve.client.bench import chunk_maker
    from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

    meta = pb.ModelMetadata()
    meta.ParseFromString(job.meta)
    chunk, pcm16 = chunk_maker(meta, job.chunk_ms, job.chunk_bytes)
    return asyncio.run(realtime_streams(
        job.target, job.model, chunk, streams=len(job.phases), chunk_s=job.chunk_ms / 1000,
        duration_s=job.duration_s, session_chunks=job.session_chunks, pcm16=pcm16,
        closed_loop=job.closed_loop, start_at=job.start_at, phases=list(job.phases),
        connections=job.connections, many=job.many, spread=job.spread, offset=job.offset,
        version=meta.version, packed=job.packed))  # the version measured, not the highest one


class LoadGenerator:
    """A pool of load processes, kept across the levels of a sweep; each opens
    ``connections`` gRPC connections (``spread``: evenly over the server's worker
    processes), and sends ``many`` streams per ``StreamMany`` stream when ``many`` > 1
    (per ``StreamPacked`` stream, their chunks in one array, with ``packed``)."""

    def __init__(self, procs: int, connections: int = 1, many: int = 0,
                 spread: bool = True, packed: bool = False) -> None:
        self.procs = max(1, procs)
        self.connections = max(1, connections)
        self.many = many
        self.spread = spread
        self.packed = packed
        self._pool: Any = multiprocessing.get_context("spawn").Pool(self.procs)

    def run(self, target: str, model: str, meta: bytes, *, streams: int, chunk_ms: int,
            chunk_bytes: int, duration_s: float, closed_loop: bool = False,
            session_chunks: int = 250) -> LoadResult:
        chunk_s = chunk_ms / 1000
        phases = [i * chunk_s / streams for i in range(streams)]
        start_at = time.time() + 1.0  # every process connected and waiting by then
        jobs, offset = [], 0
        for p in range(self.procs):
            mine = phases[p::self.procs]
            if not mine:
                continue
            jobs.append(LoadJob(target, model, meta, chunk_ms, chunk_bytes, tuple(mine),
                                duration_s, start_at, closed_loop, session_chunks,
                                min(self.connections, len(mine)), self.many, self.spread,
                                offset, self.packed))
            # the next process's first stream (group) goes to the worker after this one's
            # last: together they take the workers in turn
            offset += -(-len(mine) // self.many) if self.many > 1 else len(mine)
        result = LoadResult()
        for part in self._pool.map(_work, jobs):
            result.merge(part)
        return result

    def close(self) -> None:
        self._pool.close()
        self._pool.join()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

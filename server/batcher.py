"""Cross-session batching: one step of many sessions in one onnxruntime call.

Each model version has one ``Batcher``. ``await batcher.step(row, x)`` queues one
session's chunk (its state is row ``row`` of the model's state pool); a single
consumer task takes the first waiting step as soon as it arrives (no polling),
gathers more until the batch is full or ``max_delay_s`` has passed, splits them by
chunk length (so no time padding ever enters a state), gives each step a fresh pool
row for its new state, and runs each group in a worker thread. Outputs and new rows
go back to the waiting callers; a step that is dropped, cancelled or fails gives its
new row back, so the session's own row is never changed by a step that did not land.

The caller keeps at most one step of a session in flight (the core holds a lock
per session), so a batch never holds two steps of one session and a session's
chunks stay in order, also when ``runners`` > 1 lets batches run at once. A full
queue answers ``Overloaded`` at once instead of blocking the producer; a failed run
fails every step in it, and the batcher goes on.

A step may also be a block: ``submit_block`` queues the chunks of many sessions as one
array (a ``StreamPacked`` request's), which joins a batch as one piece and gets its
outputs back as one (the queue, the batch size and the metrics still count its
sessions). A block is taken whole into a batch, and a block's sessions run, fail or
expire together.

A step may carry a ``tag`` for the ``commit`` hook (the core's write to the shared
session store): after a group ran, the hook gets the tagged steps' tags, outputs and
new states at once, and their callers get their results only when it returned (or
the exception it gives for that step). The runner is free meanwhile, so the next
batch runs while one batch's write is in flight, and the write costs one call per
batch, not a future and a wake-up per step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from rnnserve.server.errors import BatchFailed, DeadlineExpired, Overloaded
from rnnserve.server.pool import TRASH, PoolFull, StatePool
from rnnserve.server.runtime import ModelRuntime

log = logging.getLogger("rnnserve.batcher")


def retry_after_ms(delay_s: float) -> int:
    """A retry hint for a refusal while steps wait ``delay_s``: twice that, 50 ms to 5 s."""
    return int(min(5000, max(50, 2000 * delay_s)))


# (seconds each step of the batch waited in the queue, seconds the run took)
BatchHook = Callable[[list[float], float], None]

# (tag, outputs, host copy of the new state) of each tagged step of a group that ran ->
# per step None (its caller gets its result) or the exception its caller gets instead.
# A tagged block is one step whose outputs and states have a row per session.
CommitHook = Callable[[list[tuple[Any, list[np.ndarray], list[np.ndarray] | None]]],
                      Awaitable[list[BaseException | None]]]


# What a step gives its caller: its outputs, the pool row that now holds its new state
# (the caller owns it: it becomes the session's row or is freed), and a host copy of the
# new state when the commit hook needed one (else None).
StepResult = tuple[list[np.ndarray], int, list[np.ndarray] | None]

# What a block gives its caller: its outputs, each (sessions, ...), and the rows that now
# hold its sessions' new states, in order (the caller's).
BlockResult = tuple[list[np.ndarray], list[int]]


class Group:
    """Steps queued together (one ``StreamMany`` request's) and awaited together: each
    gets a ``Slot`` instead of a future of its own, and the group's one future is done
    when the last slot is. A future per step would cost a done-callback, a scheduled
    wake-up and an ``asyncio.wait`` entry each."""

    __slots__ = ("future", "_left")

    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._left = 0

    def slot(self) -> Slot:
        self._left += 1
        return Slot(self)

    def _one_done(self) -> None:
        self._left -= 1
        if not self._left and not self.future.done():
            self.future.set_result(None)


class Slot:
    """One step's result in a ``Group``: the part of a future's interface the batcher
    and its callers use (``done``, ``cancel``, ``set_result``, ``result`` ...)."""

    __slots__ = ("_group", "_result", "_exc", "_state")
    _PENDING, _DONE, _CANCELLED = 0, 1, 2

    def __init__(self, group: Group) -> None:
        self._group = group
        self._result: StepResult | None = None
        self._exc: BaseException | None = None
        self._state = self._PENDING

    def done(self) -> bool:
        return self._state != self._PENDING

    def cancelled(self) -> bool:
        return self._state == self._CANCELLED

    def cancel(self) -> bool:
        if self._state != self._PENDING:
            return False
        self._state = self._CANCELLED
        self._group._one_done()
        return True

    def set_result(self, result: StepResult) -> None:
        if self._state != self._PENDING:
            raise asyncio.InvalidStateError("the step already has its result")
        self._result, self._state = result, self._DONE
        self._group._one_done()

    def set_exception(self, exc: BaseException) -> None:
        if self._state != self._PENDING:
            raise asyncio.InvalidStateError("the step already has its result")
        self._exc, self._state = exc, self._DONE
        self._group._one_done()

    def exception(self) -> BaseException | None:
        if self._state == self._CANCELLED:
            raise asyncio.CancelledError()
        if self._state == self._PENDING:
            raise asyncio.InvalidStateError("the step has not run yet")
        return self._exc

    def result(self) -> StepResult:
        exc = self.exception()
        if exc is not None:
            raise exc
        assert self._result is not None
        return self._result


# A queued step's result: a future of its own, or a slot of its group
StepFuture = asyncio.Future[StepResult] | Slot


class _StepQueue:
    """The batcher's queue: steps in a deque that the one consumer waits on, taken many
    at a time (``asyncio.Queue`` does more per step than one event loop's producers and
    one consumer need)."""

    __slots__ = ("maxsize", "_items", "_rows", "_waiter", "_unfinished", "_idle")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[_Step] = deque()
        self._rows = 0  # the sessions' steps queued: a block counts its sessions
        self._waiter: asyncio.Future[None] | None = None
        self._unfinished = 0  # sessions' steps queued and not yet done (``task_done``)
        self._idle: asyncio.Event | None = None

    def qsize(self) -> int:
        """The sessions' steps queued (a block's each)."""
        return self._rows

    def put(self, item: _Step) -> None:
        self._items.append(item)
        n = item.count or 1
        self._rows += n
        self._unfinished += n
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self, n: int, whole: bool = True) -> list[_Step]:
        """Steps of up to ``n`` sessions, oldest first; with ``whole`` at least one (a
        block of more sessions than ``n`` is taken alone)."""
        items = self._items
        if n >= self._rows:
            out = list(items)
            items.clear()
            self._rows = 0
            return out
        out, rows = [], 0
        while items:
            k = items[0].count or 1
            if rows + k > n and (out or not whole):
                break
            out.append(items.popleft())
            rows += k
        self._rows -= rows
        return out

    async def wait(self, timeout: float | None = None) -> bool:
        """Until a step is queued (True) or ``timeout`` seconds passed (False)."""
        if self._items:
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        return bool(self._items)

    def task_done(self, n: int) -> None:
        self._unfinished -= n
        if not self._unfinished and self._idle is not None:
            self._idle.set()

    async def join(self) -> None:
        """Until every step queued so far is done."""
        while self._unfinished:
            self._idle = asyncio.Event()
            await self._idle.wait()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclass(slots=True)
class _Step:
    x: np.ndarray
    row: int  # the pool row its state is read from (pinned while queued)
    keep: bool  # False: a stateless run, whose new state is written nowhere
    future: StepFuture
    queued_at: float
    expires: float | None = None  # perf_counter time after which it must not run
    tag: Any = None  # handed to the commit hook with the step's results
    out: int = TRASH  # the fresh row its new state goes to, once it runs
    # a block: its sessions (x is (count, T, *frame)), their rows (pinned while queued)
    # and, once it runs, the fresh rows of their new states; 0, None, None for one chunk
    count: int = 0
    rows: list[int] | None = None
    outs: list[int] | None = None

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return self.x.shape[1:] if self.count else self.x.shape

    def unpin(self, pool: StatePool) -> None:
        if self.rows is None:
            pool.unpin(self.row)
            return
        for row in self.rows:
            pool.unpin(row)

    def free_outs(self, pool: StatePool) -> None:
        if self.outs is None:
            pool.free(self.out)
            return
        for row in self.outs:
            pool.free(row)


def _alloc(pool: StatePool, n: int) -> list[int]:
    """``n`` fresh rows, or none (PoolFull) when the pool has not that many."""
    rows: list[int] = []
    try:
        for _ in range(n):
            rows.append(pool.alloc())
    except PoolFull:
        for row in rows:
            pool.free(row)
        raise
    return rows


# a group's run: the steps that ran, their outputs, host states (or None), queue waits
# and seconds
_Ran = tuple[list[_Step], list[list[np.ndarray]], list[list[np.ndarray]] | None,
             list[float], float]


class Batcher:
    def __init__(self, runtime: ModelRuntime, *, max_batch_size: int = 64,
                 max_delay_s: float = 0.002, max_queue: int = 4096, runners: int = 1,
                 on_batch: BatchHook | None = None, commit: CommitHook | None = None) -> None:
        if max_batch_size < 1 or max_delay_s < 0 or max_queue < 1 or runners < 1:
            raise ValueError("max batch size, queue and runners must be >= 1, max delay >= 0")
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._queue = _StepQueue(max_queue)
        self._on_batch = on_batch
        self.commit = commit
        # A batch is gathered only when a runner is free, so with one runner the next
        # batch fills while the current one runs; with more, runs overlap.
        self._runners = asyncio.Semaphore(runners)
        self._running: set[asyncio.Task[None]] = set()
        # Each runner runs on a thread of its own, known to warm_up(). With CUDA graphs
        # all of a model's runs go through one thread: onnxruntime keeps a captured
        # graph with the thread that captured it and does not support runs of a
        # graph-captured session from several threads (more runners then only let the
        # next batch gather while one runs).
        threads = 1 if runtime.options.cuda_graphs else runners
        self._threads = [ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix=f"ort-{runtime.name}-{i}")
                         for i in range(threads)]
        # a runner's thread, for each runner free (as many as the semaphore's count)
        self._idle = [self._threads[i % threads] for i in range(runners)]
        # held while a group waits for and runs on a thread: a group is timed, and its
        # deadlines checked, when the thread is its own (runners may share one thread)
        self._busy = {thread: asyncio.Lock() for thread in self._threads}
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.steps = 0
        self.largest_batch = 0
        self._last_run_at = time.perf_counter()  # when the last group started to run
        self._last_wait = 0.0  # the longest queue wait in that group

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._consume(), name=f"batcher-{self.runtime.name}-{self.runtime.version}")

    async def stop(self) -> None:
        """Finish what is queued, then stop the consumer and the worker thread."""
        if self._task is not None:
            await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for thread in self._threads:
            thread.shutdown(wait=True)

    async def warm_up(self, max_batch: int, every_thread: bool | None = None) -> float:
        """``runtime.warm_up`` on a runner thread, before any batch runs, so that the
        first batches do not pay for the device's per-shape set-up while clients wait;
        with ``every_thread`` (default: with CUDA graphs) on each runner thread in turn.
        With CUDA graphs every graph is captured here, on the thread that will replay
        it, one at a time, never while another run is under way (a capture fails when
        any other CUDA work starts meanwhile), and none after. Returns the seconds."""
        if self._task is not None:  # a capture must not meet a batch's run
            raise RuntimeError("warm up a batcher before it starts")
        if every_thread is None:
            every_thread = self.runtime.options.cuda_graphs
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        for thread in self._threads if every_thread else self._threads[:1]:
            await loop.run_in_executor(thread, self.runtime.warm_up, max_batch)
        self.runtime.seal()
        return time.perf_counter() - started

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def max_queue(self) -> int:
        """Steps queued beyond which a step is refused (Overloaded)."""
        return self._queue.maxsize

    def delay_s(self) -> float:
        """How long a step waits here now, for admission control: the longest queue wait
        of the last group run in the past second, or, while steps are queued and no group
        has started for longer than that, the time since one did (a stalled model)."""
        since = time.perf_counter() - self._last_run_at
        recent = self._last_wait if since < 1.0 else 0.0
        return max(recent, since) if self._queue.qsize() else recent

    async def step(self, row: int, x: np.ndarray, expires: float | None = None,
                   tag: Any = None, keep: bool = True) -> StepResult:
        """Run one chunk of the session whose state is in pool row ``row``; return its
        outputs, the fresh row now holding its new state (the caller's to keep or free;
        TRASH when ``keep`` is False) and the host copy the commit hook used (or None).
        ``row`` is not changed. A step still queued at ``expires`` (a perf_counter time)
        is dropped: DeadlineExpired. A ``tag`` goes to the commit hook, which runs before
        this returns."""
        future = self.submit(row, x, expires, tag, keep)
        assert isinstance(future, asyncio.Future)
        try:
            return await future
        except asyncio.CancelledError:
            self.abandon(future)
            raise

    def submit(self, row: int, x: np.ndarray, expires: float | None = None,
               tag: Any = None, keep: bool = True, group: Group | None = None) -> StepFuture:
        """Queue a step (as ``step``) without waiting for it: its future (or, in a
        ``group``, its slot) gets what ``step`` returns. Many steps queued at once cost
        one wait for all of them, not a task each. A caller that stops waiting gives
        the future to ``abandon``."""
        if self._queue.qsize() >= self._queue.maxsize:
            raise Overloaded(f"model {self.runtime.name!r} has {self._queue.maxsize} steps "
                             "queued; retry after a short delay",
                             retry_after_ms=retry_after_ms(self.delay_s()))
        future: StepFuture = asyncio.get_running_loop().create_future() if group is None \
            else group.slot()
        self.runtime.pool.pin(row)  # a session ending meanwhile keeps it until it ran
        self._queue.put(_Step(x, row, keep, future, time.perf_counter(), expires, tag))
        return future

    def submit_block(self, rows: list[int], x: np.ndarray, expires: float | None,
                     group: Group, tag: Any = None) -> Slot:
        """Queue the chunks ``x`` (len(rows), T, *frame) of the sessions whose states are
        in pool rows ``rows`` as one block; its slot in ``group`` gets a ``BlockResult``
        (given to ``abandon`` when nobody waits for it any more). The rows are not
        changed. Refused whole (Overloaded) when its sessions would pass the queue's
        bound. A ``tag`` goes to the commit hook with the block's outputs and new
        states, each (sessions, ...), as one step: the hook answers for the whole
        block (a session it refuses is its tag's business)."""
        if not rows:
            raise ValueError("a block holds at least one session")
        queue = self._queue
        if queue.qsize() and queue.qsize() + len(rows) > queue.maxsize:
            raise Overloaded(f"model {self.runtime.name!r} has {queue.qsize()} steps "
                             f"queued (at most {queue.maxsize}); retry after a short delay",
                             retry_after_ms=retry_after_ms(self.delay_s()))
        slot = group.slot()
        pool = self.runtime.pool
        for row in rows:
            pool.pin(row)
        queue.put(_Step(x, TRASH, True, slot, time.perf_counter(), expires, tag,
                        count=len(rows), rows=rows))
        return slot

    def abandon(self, future: StepFuture) -> None:
        """A submitted step nobody waits for any more: dropped if it has not run, and a
        new row it already got freed (it would be nobody's)."""
        if not future.done():
            future.cancel()  # the batcher skips it (or frees its row once it ran)
        elif not future.cancelled() and future.exception() is None:
            got = future.result()[1]
            for row in got if isinstance(got, list) else (got,):
                self.runtime.pool.free(row)

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        queue, most = self._queue, self.max_batch_size
        while True:
            await self._runners.acquire()
            await queue.wait()
            batch = queue.take(most)
            rows = sum(s.count or 1 for s in batch)
            deadline = loop.time() + self.max_delay_s
            while rows < most:
                if queue.qsize():
                    more = queue.take(most - rows, whole=False)
                    if not more:  # a block that does not fit: it starts the next batch
                        break
                    batch += more
                    rows += sum(s.count or 1 for s in more)
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0 or not await queue.wait(remaining):
                    break
            thread = self._idle.pop()  # one is idle: the semaphore counts them
            task = loop.create_task(self._run_batch(loop, batch, thread))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Step],
                         thread: ThreadPoolExecutor) -> None:
        commits: list[asyncio.Task[None]] = []
        last: list[tuple[_Step, list[np.ndarray], list[np.ndarray] | None]] = []
        todo: list[list[_Step]] = []
        try:
            try:
                groups: dict[tuple[int, ...], list[_Step]] = defaultdict(list)
                for item in batch:
                    if item.future.done():  # the caller went away (a cancelled call)
                        item.unpin(self.runtime.pool)
                        continue
                    groups[item.chunk_shape].append(item)
                todo = list(groups.values())
                while todo:
                    tagged = await self._run(loop, todo.pop(0), thread)
                    if tagged and todo:  # it commits while the next group runs
                        commits.append(loop.create_task(self._commit(tagged)))
                    else:
                        last = tagged
            except BaseException:  # a bug, or the batcher stopped: the groups not run
                for s in (s for group in todo for s in group):  # yet are answered, unpinned
                    s.unpin(self.runtime.pool)
                    if not s.future.done():
                        s.future.set_exception(BatchFailed("the chunk did not run; nothing "
                                                           "advanced"))
                raise
            finally:
                self._idle.append(thread)
                self._runners.release()  # the next batch may run while this one commits
            if last:
                await self._commit(last)  # in this task: one event-loop turn less per step
            if commits:
                await asyncio.gather(*commits)
        finally:
            self._queue.task_done(sum(s.count or 1 for s in batch))

    async def _run(self, loop: asyncio.AbstractEventLoop, group: list[_Step],
                   thread: ThreadPoolExecutor
                   ) -> list[tuple[_Step, list[np.ndarray], list[np.ndarray] | None]]:
        """Run a group; answer its untagged steps; return the tagged ones with their
        results, for the commit hook. Each kept step's new state goes to a fresh row."""
        async with self._busy[thread]:
            ran = await self._run_on(loop, group, thread)
        if ran is None:
            return []
        group, outputs, states, waits, seconds = ran
        pool = self.runtime.pool
        tagged = []
        host = states if states is not None else [None] * len(group)
        for s, out, st in zip(group, outputs, host, strict=True):
            if s.future.done():  # cancelled while it ran: its new row is nobody's
                s.free_outs(pool)
                continue
            if s.tag is not None and self.commit is not None:
                tagged.append((s, out, st))
            elif s.outs is not None:  # a block
                s.future.set_result((out, s.outs))  # type: ignore[arg-type]
            else:
                s.future.set_result((out, s.out, st))
        self.batches += 1
        self.steps += len(waits)
        self.largest_batch = max(self.largest_batch, len(waits))
        if self._on_batch is not None:
            self._on_batch(waits, seconds)
        return tagged

    async def _run_on(self, loop: asyncio.AbstractEventLoop, group: list[_Step],
                      thread: ThreadPoolExecutor) -> _Ran | None:
        """The group's run on ``thread``, once it is free; None when none ran."""
        pool = self.runtime.pool
        started = time.perf_counter()
        # admission: the longest wait, of the steps that run or not
        self._last_run_at = started
        self._last_wait = max(started - s.queued_at for s in group)
        runnable = []
        blocks = False
        for s in group:  # a fixed pool out of rows refuses the steps that find none
            if s.future.done():  # given up while an earlier group of its batch ran
                s.unpin(pool)
                continue
            # checked as the group starts, not as the batch does: a step whose deadline
            # came while an earlier group of its batch ran has not run by then either
            if s.expires is not None and started >= s.expires:
                s.unpin(pool)
                s.future.set_exception(DeadlineExpired(
                    f"the chunk waited {(started - s.queued_at) * 1000:.0f} ms for its "
                    "batch, past its deadline; it did not run and nothing advanced"))
                continue
            try:
                if s.rows is not None:
                    blocks = True
                    s.outs = _alloc(pool, len(s.rows))
                else:
                    s.out = pool.alloc() if s.keep else TRASH
            except PoolFull as full:
                s.unpin(pool)
                s.future.set_exception(full)
                continue
            runnable.append(s)
        if not runnable:
            return None
        group = runnable
        # the metrics: the sessions' steps that run (a block's each)
        waits = [started - s.queued_at for s in group] if not blocks else \
            [w for s in group for w in [started - s.queued_at] * (s.count or 1)]
        want_states = self.commit is not None and any(s.tag is not None for s in group)
        if blocks:  # a row per session; run_rows joins and splits each block as one
            rows = [r for s in group for r in (s.rows if s.rows is not None else (s.row,))]
            outs = [r for s in group for r in (s.outs if s.outs is not None else (s.out,))]
            args: tuple[Any, ...] = ([s.x for s in group], rows, outs, want_states,
                                     [s.count for s in group])
        else:
            args = ([s.x for s in group], [s.row for s in group], [s.out for s in group],
                    want_states)
        try:
            outputs, states = await loop.run_in_executor(
                thread, self.runtime.run_rows, *args)
        except Exception:
            log.exception("batch of %d steps failed on model %s v%d", len(waits),
                          self.runtime.name, self.runtime.version)
            for s in group:
                s.free_outs(pool)
                if not s.future.done():
                    s.future.set_exception(BatchFailed("the model failed to run this chunk"))
            return None
        finally:
            for s in group:
                s.unpin(pool)
        return group, outputs, states, waits, time.perf_counter() - started

    async def _commit(self, tagged: list[tuple[_Step, list[np.ndarray], list[np.ndarray] | None]]
                      ) -> None:
        assert self.commit is not None
        try:
            failures = await self.commit([(s.tag, out, st) for s, out, st in tagged])
        except Exception:
            log.exception("committing %d steps of model %s v%d failed", len(tagged),
                          self.runtime.name, self.runtime.version)
            failures = [BatchFailed("the chunk ran but its result could not be kept; "
                                    "nothing advanced") for _ in tagged]
        for (s, out, st), failure in zip(tagged, failures, strict=True):
            if s.future.done() or failure is not None:
                s.free_outs(self.runtime.pool)  # the sessions keep their old rows
                if not s.future.done():
                    assert failure is not None
                    s.future.set_exception(failure)
                continue
            if s.outs is not None:
                s.future.set_result((out, s.outs))  # type: ignore[arg-type]
            else:
                s.future.set_result((out, s.out, st))

"""The event loop's CPU per ``StreamMany`` item (or ``StreamPacked`` session, with
``--rpc packed``, or ``Stream`` chunk, one stream per session, with ``--rpc stream``),
in process: the server's servicer called directly (no gRPC, no
network), on the CPU. Beside gRPC's own work this is what a host
spends per chunk when a GPU runs the model (docs/benchmarks.md, "The host's work per
chunk"), and it drifts far less than a benchmark over gRPC on a shared machine.

    python scripts/loop_cost.py --repo runs/workloads/speech-tiny [--model NAME]
        [--groups 16] [--per 64] [--rounds 40] [--repeats 3] [--against DIR] [--profile]
        [--rpc many[,packed][,stream]] [--store redis [--shards N[,M]]]

``--against DIR``: another checkout of rnnserve (``git worktree add /tmp/base REV``);
the two builds take turns, each in a fresh process, and the medians are compared.
``--rpc many,packed``: both RPCs in turns (of this build); with ``--against``, one RPC,
which both builds run.
``--profile``: cProfile's top functions of one run (its overhead inflates the times).
``--store redis``: the server on the shared session store (a throw-away redis-server on
127.0.0.1, started per run), every step written there before it is answered; the
redis-server's own CPU per item is printed beside the loop's. ``--shards N``: N
redis-servers, the store sharded over them (their CPU per item is printed summed and
each); ``--shards 1,3``: one and three in turns.
Build a model repository first, e.g. ``rnnserve bench --workload speech-tiny --streams 1
--duration-s 1`` (it lands in runs/workloads/speech-tiny).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PACKAGES = ("training", "export", "server", "client", "protos")  # rnnserve.<name> = <name>/


def _lay_out(root: Path, where: Path) -> None:
    """Make ``where`` (to go first on sys.path) hold an ``rnnserve`` package that is
    ``root``'s code, laid out as the distribution maps it (rnnserve/ plus the top-level
    packages)."""
    pkg = where / "rnnserve"
    pkg.mkdir()
    for f in (root / "rnnserve").iterdir():
        (pkg / f.name).symlink_to(f.resolve())
    for name in PACKAGES:
        (pkg / name).symlink_to((root / name).resolve())


async def _measure(repo: str, model: str, groups: int, per: int, rounds: int,
                   profile: bool, rpc: str = "many", store: str = "memory",
                   redis_pids: tuple[int, ...] = ()) -> dict[str, Any]:
    import asyncio

    import numpy as np

    from rnnserve.client.bench import cpu_seconds
    from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.protos.tensors import to_tensor
    from rnnserve.server.api import InferenceServicer
    from rnnserve.server.app import RnnServer
    from rnnserve.server.settings import Settings

    settings = Settings(repo=Path(repo), host="127.0.0.1", grpc_port=0, metrics_port=0,
                        device="cpu", intra_op_threads=1, warmup="off",
                        max_batch_size=max(64, per * 4), max_sessions=groups * per + 64,
                        session_store=store)
    server = RnnServer(settings)
    await server.start()
    try:
        core = server.core
        runtime = core.registry.get(model) if model else next(iter(core.registry))
        servicer = InferenceServicer(core, server.streams)
        inp = runtime.meta.input
        rng = np.random.default_rng(0)
        if inp.kind == "pcm16":  # four hops of audio
            chunk = pb.Chunk(pcm16=rng.integers(-3000, 3000, 4 * (inp.hop_samples or 160)
                                                ).astype("<i2").tobytes())
        elif inp.kind == "utf8_bytes":
            chunk = pb.Chunk(text="four")
        else:
            frame = [int(d) for d in inp.shape[2:]]
            chunk = pb.Chunk(tensor=to_tensor(
                rng.standard_normal((4, *frame)).astype(np.dtype(inp.dtype))))
        sids = [[(await core.open(runtime.name, runtime.version))[0].id for _ in range(per)]
                for _ in range(groups)]

        def request(g: int, k: int) -> pb.ManyRequest:  # built alike for every build
            req = pb.ManyRequest(id=k)
            for sid in sids[g]:
                c = req.items.add(session_id=sid).chunk
                c.CopyFrom(chunk)
                c.seq = k
            return req

        def packed(g: int, k: int) -> pb.PackedRequest:  # the same chunk for each session
            req = pb.PackedRequest(id=k, model=runtime.name, version=runtime.version)
            req.session_ids.extend(sids[g])
            req.seqs.extend([k] * per)
            if chunk.HasField("tensor"):
                t = chunk.tensor
                req.chunks.dtype, req.chunks.data = t.dtype, t.data * per
                req.chunks.shape.extend([per, *t.shape])
            else:  # PCM16 samples or text bytes, as the model's input tensor
                data = chunk.pcm16 or chunk.text.encode()
                req.chunks.dtype = pb.DATA_TYPE_INT16 if chunk.pcm16 else pb.DATA_TYPE_UINT8
                req.chunks.data = data * per
                req.chunks.shape.extend([per, len(data) // (2 if chunk.pcm16 else 1)])
            return req

        if rpc == "stream":  # one Stream per session, closed loop (the next chunk once
            # the last is answered: the servicer reads it after yielding the answer)
            return await _measure_streams(servicer, runtime, chunk, sids, rounds, profile)
        requests = [[(packed if rpc == "packed" else request)(g, k) for k in range(rounds)]
                    for g in range(groups)]

        async def stream(g: int, first: int, last: int) -> None:
            for k in range(first, last):
                if rpc == "packed":
                    got = await servicer._packed(requests[g][k], None)
                    if got.code or got.failures:
                        raise RuntimeError(f"a session failed: {got.message} "
                                           f"{got.failures[:1]}")
                    continue
                resp = await servicer._many(requests[g][k], None)
                failed = [r for r in resp.results if r.code]
                if failed:
                    raise RuntimeError(f"an item failed: {failed[0].message}")

        warm = min(5, rounds - 1)
        await asyncio.gather(*(stream(g, 0, warm) for g in range(groups)))
        redis_cpu = [cpu_seconds(pid) for pid in redis_pids]
        out = await _timed(asyncio.gather(*(stream(g, warm, rounds) for g in range(groups))),
                           groups * per * (rounds - warm), profile)
        if redis_pids:
            each = [1e6 * (cpu_seconds(pid) - before) / out["items"]
                    for pid, before in zip(redis_pids, redis_cpu, strict=True)]
            out["redis_cpu_us"], out["redis_cpu_us_each"] = sum(each), each
        return out
    finally:
        await server.stop()


async def _timed(run: Any, items: int, profile: bool) -> dict[str, Any]:
    """The event loop's CPU and the wall time per item of awaiting ``run``, under
    cProfile with ``profile`` (its top functions to stderr)."""
    import cProfile
    import pstats
    import time

    prof = cProfile.Profile() if profile else None
    wall, cpu = time.perf_counter(), time.thread_time()
    if prof is not None:
        prof.enable()
    await run
    if prof is not None:
        prof.disable()
    out = {"loop_cpu_us": 1e6 * (time.thread_time() - cpu) / items,
           "wall_us": 1e6 * (time.perf_counter() - wall) / items, "items": items}
    if prof is not None:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    return out


class _Context:
    """What the servicer reads of a call's gRPC context, for ``Stream`` in process."""

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: Any, details: str = "", *_: Any) -> None:
        raise RuntimeError(f"a stream failed: {code} {details}")


async def _measure_streams(servicer: Any, runtime: Any, chunk: Any, sids: list[list[str]],
                           rounds: int, profile: bool) -> dict[str, Any]:
    """The loop's CPU per chunk of ``Stream`` calls, one per session, each resuming its
    session, then its chunks one by one; timed from a point all streams wait at once
    their warm-up chunks are answered."""
    import asyncio

    from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

    flat = [sid for group in sids for sid in group]
    warm = min(5, rounds - 1)
    arrived, all_there, go = [0], asyncio.Event(), asyncio.Event()

    async def requests(sid: str) -> Any:
        yield pb.StreamRequest(open=pb.OpenSessionRequest(
            model=runtime.name, version=runtime.version, session_id=sid, resume=True))
        for k in range(rounds):
            if k == warm:
                arrived[0] += 1
                if arrived[0] == len(flat):
                    all_there.set()
                await go.wait()
            req = pb.StreamRequest()
            req.chunk.CopyFrom(chunk)
            req.chunk.seq = k
            yield req

    async def stream(sid: str) -> None:
        n = 0
        async for resp in servicer.Stream(requests(sid), _Context()):
            n += resp.HasField("result")
        if n != rounds:
            raise RuntimeError(f"a stream got {n} answers of {rounds}")

    tasks = [asyncio.ensure_future(stream(sid)) for sid in flat]
    there = asyncio.ensure_future(all_there.wait())
    # a stream that fails before the barrier would leave the others waiting there
    await asyncio.wait([there, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if not there.done():
        there.cancel()
        go.set()
        for t in tasks:
            if t.done() and t.exception() is not None:
                for other in tasks:
                    other.cancel()
                raise t.exception()  # type: ignore[misc]
        raise RuntimeError("a stream ended before the others were warm")

    async def run() -> None:
        go.set()
        await asyncio.gather(*tasks)

    return await _timed(run(), len(flat) * (rounds - warm), profile)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True)
    ap.add_argument("--model", default="")
    ap.add_argument("--groups", type=int, default=16, help="StreamMany streams at once")
    ap.add_argument("--per", type=int, default=64, help="sessions per request")
    ap.add_argument("--rounds", type=int, default=40, help="requests per stream (5 warm)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--against", type=Path, help="another checkout, in turns with this one")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rpc", default="many",
                    help="many, packed, stream, or several in turns (many,packed)")
    ap.add_argument("--store", default="memory", choices=("memory", "redis"),
                    help="the session store: memory, or a redis-server started per run")
    ap.add_argument("--shards", default="1",
                    help="with --store redis: this many redis-servers, the store sharded "
                    "(1,3: both in turns)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child's run
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 2 or args.groups < 1 or args.per < 1 or args.repeats < 1:
        ap.error("--rounds must be at least 2; --groups, --per and --repeats at least 1")
    rpcs = args.rpc.split(",")
    if not set(rpcs) <= {"many", "packed", "stream"} or (args.one and len(rpcs) > 1):
        ap.error("--rpc takes many, packed, stream or several of them (many,stream)")
    try:
        shards = [int(n) for n in args.shards.split(",")]
    except ValueError:
        ap.error(f"--shards takes numbers like 3 or 1,3, not {args.shards!r}")
    if min(shards) < 1 or (max(shards) > 1 and args.store != "redis"):
        ap.error("--shards takes 1 or more, and more than 1 only with --store redis")
    if len(shards) > 1 and (args.one or args.against or len(rpcs) > 1):
        ap.error("--shards in turns (1,3) takes one RPC and no --against")
    if "stream" in rpcs and args.store != "memory":
        ap.error("--rpc stream runs on the in-memory store only")
    if args.against and len(rpcs) > 1:
        ap.error("--against compares one RPC: give --rpc many, packed or stream")
    if args.one:
        import asyncio
        import logging

        logging.basicConfig(level=logging.WARNING)
        with tempfile.TemporaryDirectory(prefix="rnnserve-build-") as where:
            if args.root is not None:
                _lay_out(args.root, Path(where))
                sys.path.insert(0, where)
            redis: list[Any] = []
            try:
                if args.store == "redis":
                    from rnnserve.client.bench import RedisProcess

                    for i in range(shards[0]):
                        (Path(where) / f"redis{i}").mkdir()
                        redis.append(RedisProcess(Path(where) / f"redis{i}"))
                print(json.dumps(asyncio.run(_measure(
                    args.repo, args.model, args.groups, args.per, args.rounds, args.profile,
                    args.rpc, ",".join(r.url for r in redis) if redis else "memory",
                    tuple(r.proc.pid for r in redis if r.proc)))))
            finally:
                for r in redis:
                    r.stop()
        return 0
    here = Path(__file__).resolve().parents[1]
    builds = {(f"this {rpc}" if len(rpcs) > 1 else "this"): (here, rpc, shards[0])
              for rpc in rpcs}
    if len(shards) > 1:
        builds = {f"this {n} shard{'s' if n > 1 else ''}": (here, rpcs[0], n) for n in shards}
    if args.against:
        builds["against"] = (args.against.resolve(), rpcs[0], shards[0])
    got: dict[str, list[float]] = {name: [] for name in builds}
    for _ in range(args.repeats):
        for name, (root, rpc, n) in builds.items():
            cmd = [sys.executable, __file__, "--one", "--repo", args.repo, "--model", args.model,
                   "--groups", str(args.groups), "--per", str(args.per),
                   "--rounds", str(args.rounds), "--root", str(root), "--rpc", rpc,
                   "--store", args.store,
                   *(["--shards", str(n)] if n > 1 else []),
                   *(["--profile"] if args.profile else [])]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                sys.stderr.write(run.stderr[-3000:])
                return run.returncode
            if args.profile:
                sys.stderr.write(run.stderr)
            result = json.loads(run.stdout.strip().splitlines()[-1])
            got[name].append(result["loop_cpu_us"])
            redis_cpu = (f", redis-server CPU {result['redis_cpu_us']:.1f} us"
                         if "redis_cpu_us" in result else "")
            if len(result.get("redis_cpu_us_each", ())) > 1:
                redis_cpu += " (" + " + ".join(f"{v:.1f}" for v in
                                               result["redis_cpu_us_each"]) + ")"
            print(f"{name} ({root}): loop CPU {result['loop_cpu_us']:.1f} us per item, "
                  f"wall {result['wall_us']:.1f} us{redis_cpu} ({result['items']} items)",
                  flush=True)
    medians = {name: statistics.median(v) for name, v in got.items()}
    print("median loop CPU per item: " + ", ".join(f"{n} {m:.1f} us" for n, m in medians.items())
          + (f"; this / against = {medians['this'] / medians['against']:.2f}"
             if "against" in medians else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

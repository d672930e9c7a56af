"""``rnnserve reshard``: move the sessions of the shared store to a new list of shards.

A session's keys live on the shard ``shared.shard_of`` picks from its id and the number
of shards, so a new list (one more Redis, one fewer, one store to several) puts some
sessions elsewhere; servers with the new list would not find them there. With the
servers stopped, this moves each such session's keys (record, lease, final answer) to
its new shard, with their time to live, byte for byte (``DUMP`` / ``RESTORE``), and
marks every shard with its new place (``RedisStore.ping``) and each shard left out as
retired (a server that still lists one is refused, at its start or within
``--store-check-s`` while it runs). Keys already in place are not touched, so running
it again after an interruption finishes the job.

It refuses to start when the old shards do not carry the marks of ``--from`` (the list
the servers ran with), and while a session's lease is live (a server may still be
writing: stop the servers, or wait out ``--lease-s`` after a crash), unless told to
ignore leases.

Online (``--online``), the servers keep running: they are first restarted with
``--session-store NEW --session-store-from OLD``, and hand off each session they load
that is not on its new shard yet (``shared.MovingStore``). This then hands off the
rest the same way (``HANDOFF`` on the old shard, ``RESTORE`` on the new one), waits
for the leases of servers still on the old list to lapse (up to ``--wait-s``), and
marks the shards with their new places; the servers can then drop
``--session-store-from``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from redis.exceptions import RedisError, ResponseError

from rnnserve.errors import RnnserveError
from rnnserve.server.shared import (
    HANDOFF,
    RESTORE,
    RETIRED,
    SETTLED,
    resharding_id,
    shard_of,
)

T = TypeVar("T")
# record, lease, final answer, and the arrival of a session handed off by an online
# resharding (shared.py)
KINDS = ("s", "l", "f", "a")


@dataclass
class Plan:
    """What a reshard moves: per (old shard, new shard) the sessions' ids."""

    moves: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    kept: int = 0  # sessions already on their new shard
    leased: int = 0  # sessions whose lease is live

    @property
    def moving(self) -> int:
        return sum(len(ids) for ids in self.moves.values())


def _sid(key: bytes, prefix: str) -> tuple[str, str] | None:
    """(session id, kind) of a session key ``PREFIX:{ID}:KIND``, None for another key."""
    text = key.decode(errors="replace")
    head = f"{prefix}:{{"
    if not text.startswith(head) or text[-2:-1] != ":" or text[-1] not in KINDS \
            or text[-3] != "}":
        return None
    return text[len(head):-3], text[-1]


class Resharder:
    def __init__(self, old: list[str], new: list[str], prefix: str = "rnnserve",
                 timeout_s: float = 10.0) -> None:
        for name, urls in (("--from", old), ("--to", new)):
            if not urls or len(set(urls)) != len(urls):
                raise RnnserveError(f"{name} needs one or more distinct store URLs, got "
                                    f"{','.join(urls)!r}")
        self.old, self.new, self.prefix = old, new, prefix
        self.shards = [*old, *(u for u in new if u not in old)]  # of both lists
        self._clients: dict[str, redis.Redis] = {}
        self.timeout_s = timeout_s

    def client(self, url: str) -> redis.Redis:
        if url not in self._clients:
            self._clients[url] = redis.Redis.from_url(url, socket_timeout=self.timeout_s,
                                                      socket_connect_timeout=self.timeout_s)
        return self._clients[url]

    def close(self) -> None:
        for c in self._clients.values():
            c.close()

    def _mark(self) -> str:
        return f"{self.prefix}:shard"

    def check_marks(self) -> None:
        """Each old shard carries the mark of its place in ``--from``, or of its place
        in ``--to`` or retired where ``--to`` leaves it out (a reshard that finished:
        running it again moves nothing), or none (a store no server has reached yet)."""
        n = len(self.old)
        for i, url in enumerate(self.old):
            got: Any = self._call(url, lambda c: c.get(self._mark()))
            done = got == (f"{self.new.index(url)}/{len(self.new)}" if url in self.new
                           else RETIRED).encode()
            if got is not None and got.decode() != f"{i}/{n}" and not done:
                raise RnnserveError(
                    f"the store at {url} is shard {got.decode()} (index/count) of the list "
                    f"its servers ran with, not {i}/{n}: --from must list the shards as the "
                    "servers did, in the same order")

    def under_way(self, url: str) -> str | None:
        """The online resharding under way (or "done ID") on a shard, None if none."""
        got: Any = self._call(url, lambda c: c.get(f"{self.prefix}:resharding"))
        return None if got is None else str(got.decode())

    def check_not_online(self) -> None:
        """No online resharding is under way on a shard of either list (``MovingStore``
        servers, or ``reshard --online`` not finished)."""
        for url in self.shards:
            got = self.under_way(url)
            if got is not None and not got.startswith("done "):
                raise RnnserveError(
                    f"the store at {url} is being resharded online ({got}): finish "
                    "that with `rnnserve reshard --online` and the lists the servers run "
                    "with first")

    def _call(self, url: str, fn: Callable[[redis.Redis], T]) -> T:
        try:
            return fn(self.client(url))
        except RedisError as exc:
            raise RnnserveError(f"the store at {url}: {exc}") from None

    def _tombstone(self, url: str, key: bytes) -> bool:
        """Whether a lease key is the tombstone of an online resharding (``moved``), not
        a server's lease."""
        got: Any = self._call(url, lambda c: c.get(key))
        return bool(got == b"moved")

    def plan(self) -> Plan:
        """Scan the old shards: which sessions move where, how many stay, and how many
        hold a live lease."""
        plan = Plan()
        n = len(self.new)
        for i, url in enumerate(self.old):
            seen: set[str] = set()

            def scan(c: redis.Redis) -> list[bytes]:
                return list(c.scan_iter(match=f"{self.prefix}:{{*}}:?", count=1000))

            keys = self._call(url, scan)
            for key in keys:
                got = _sid(key, self.prefix)
                if got is None:
                    continue
                sid, kind = got
                if kind == "l" and not self._tombstone(url, key):
                    plan.leased += 1
                if sid in seen:
                    continue
                seen.add(sid)
                j = shard_of(sid, n)
                if self.new[j] == url:
                    plan.kept += 1
                else:
                    plan.moves.setdefault((i, j), []).append(sid)
        return plan

    def move(self, plan: Plan, log: Callable[[str], None]) -> Counter[str]:
        """Move the planned sessions' keys; returns counts of moved sessions and of
        keys that were already on the new shard (left on both: ``conflicts``)."""
        done: Counter[str] = Counter()
        for (i, j), sids in sorted(plan.moves.items()):
            src, dst = self.client(self.old[i]), self.client(self.new[j])
            for sid in sids:
                keys = [f"{self.prefix}:{{{sid}}}:{k}" for k in KINDS]
                try:
                    if self._move_one(src, dst, keys):
                        done["moved"] += 1
                    else:
                        done["conflicts"] += 1
                        log(f"session {sid!r}: the new shard {self.new[j]} holds keys of it "
                            "already; left on both (delete the stale copy by hand)")
                except RedisError as exc:
                    raise RnnserveError(
                        f"moving session {sid!r} from {self.old[i]} to {self.new[j]}: "
                        f"{exc}; {done['moved']} moved so far: run it again to finish"
                    ) from None
            log(f"  {len(sids)} session(s) from shard {i} ({self.old[i]}) to new shard "
                f"{j} ({self.new[j]})")
        return done

    @staticmethod
    def _move_one(src: redis.Redis, dst: redis.Redis, keys: list[str]) -> bool:
        """Copy the keys that exist (with their time to live) to ``dst``, then delete
        them on ``src``; False, touching nothing, if ``dst`` has any of them."""
        if dst.exists(*keys):
            return False
        pipe = src.pipeline(transaction=False)
        for k in keys:
            pipe.dump(k)
            pipe.pttl(k)
        got = pipe.execute()
        moved = []
        for k, blob, ttl in zip(keys, got[0::2], got[1::2], strict=True):
            if blob is None:
                continue  # expired or never there
            if k.endswith(":l") and src.get(k) == b"moved":
                moved.append(k)  # a tombstone of an online resharding: dropped, not moved
                continue
            try:
                dst.restore(k, max(0, ttl), blob)  # ttl -1 (none): 0
            except ResponseError as exc:
                if "BUSYKEY" in str(exc):
                    return False
                raise
            moved.append(k)
        if moved:
            src.delete(*moved)
        return True

    def mark(self, offline: bool = True) -> None:
        """Every new shard gets its place; an old shard left out is marked retired.
        ``offline``: the record of an online resharding that ended goes too (a later
        one between the same lists is a new one), but from the new list's shards only:
        a retired shard keeps it, so that servers still on that resharding's lists
        (``--session-store-from``) go on accepting it as retired."""
        n = len(self.new)
        if offline:
            for url in self.new:
                self._call(url, lambda c: c.delete(f"{self.prefix}:resharding"))
        for j, url in enumerate(self.new):  # first: a server still on the old list
            place = f"{j}/{n}"  # that checks meanwhile sees its list changed here

            def put(c: redis.Redis, place: str = place) -> Any:
                return c.set(self._mark(), place)

            self._call(url, put)
        for url in self.old:  # a server that still lists it is refused
            if url not in self.new:
                self._call(url, lambda c: c.set(self._mark(), RETIRED))


def reshard(old: list[str], new: list[str], *, prefix: str = "rnnserve",
            dry_run: bool = False, ignore_leases: bool = False,
            log: Callable[[str], None] = print) -> dict[str, int]:
    """Move the store's sessions from the shards ``old`` to ``new`` (module doc)."""
    r = Resharder(old, new, prefix)
    try:
        r.check_marks()
        r.check_not_online()
        plan = r.plan()
        log(f"{plan.moving} session(s) move, {plan.kept} stay where they are "
            f"({len(old)} shard(s) -> {len(new)})")
        if plan.leased and not ignore_leases and not dry_run:
            raise RnnserveError(
                f"{plan.leased} session(s) hold a live lease: a server may still be "
                "running on this store (stop every server first), or crashed less than "
                "its --lease-s ago (wait that out); --ignore-leases moves them anyway")
        if dry_run:
            for (i, j), sids in sorted(plan.moves.items()):
                log(f"  would move {len(sids)} from shard {i} ({old[i]}) to new shard {j} "
                    f"({new[j]})")
            return {"moving": plan.moving, "kept": plan.kept, "moved": 0, "conflicts": 0}
        done = r.move(plan, log)
        r.mark()
        log(f"moved {done['moved']} session(s); {done['conflicts']} left on both shards; "
            f"the shards are marked for --session-store {','.join(new)}")
        return {"moving": plan.moving, "kept": plan.kept, "moved": done["moved"],
                "conflicts": done["conflicts"]}
    finally:
        r.close()


ONLINE_OWNER = "rnnserve-reshard"  # the lease owner of the online mover (shared.py)
_ENDED = """
local r = redis.call('GET', KEYS[1])
if not r or r == ARGV[1] then redis.call('SET', KEYS[1], 'done ' .. ARGV[1]) end
return 0
"""
_DROP_TOMBSTONE = """
if redis.call('GET', KEYS[1]) == 'moved' then redis.call('DEL', KEYS[1]); return 1 end
return 0
"""


class OnlineResharder(Resharder):
    """Hands off, with the servers running, the sessions the new list puts elsewhere
    (module doc)."""

    def __init__(self, old: list[str], new: list[str], prefix: str = "rnnserve") -> None:
        super().__init__(old, new, prefix)
        self.id = resharding_id(old, new)

    def check_under_way(self) -> None:
        """This resharding is under way (or ended) on every shard of both lists: the
        servers run with ``--session-store-from`` these lists (module doc)."""
        for url in self.shards:
            text = self.under_way(url)
            if text not in (self.id, f"done {self.id}"):
                raise RnnserveError(
                    f"the store at {url} is "
                    + (f"being resharded online with other lists ({text}, not {self.id}): "
                       "--from and --to must be the servers' --session-store-from and "
                       "--session-store" if text and not text.startswith("done ")
                       else f"not being resharded online to these lists ({self.id}): "
                       f"first restart every server with --session-store {','.join(self.new)}"
                       f" --session-store-from {','.join(self.old)}"))

    def _movers(self, url: str) -> dict[str, set[str]]:
        """The sessions on old shard ``url`` that the new list puts elsewhere, with the
        kinds of their keys there."""
        keys = self._call(url, lambda c: list(
            c.scan_iter(match=f"{self.prefix}:{{*}}:?", count=1000)))
        sids: dict[str, set[str]] = {}
        n = len(self.new)
        for key in keys:
            got = _sid(key, self.prefix)
            if got is not None and self.new[shard_of(got[0], n)] != url:
                sids.setdefault(got[0], set()).add(got[1])
        return sids

    def sweep(self, ttl_ms: int, log: Callable[[str], None]) -> tuple[Counter[str], int]:
        """One pass over the old shards; returns the counts (``moved``: handed off now;
        ``there``: old copies of sessions on their new shard already, dropped;
        ``finals``: final answers moved) and how many are held by a live lease (left
        for another pass)."""
        done: Counter[str] = Counter()
        held = 0
        restores = {url: self.client(url).register_script(RESTORE) for url in self.new}
        for i, url in enumerate(self.old):
            src = self.client(url)
            handoff, settled = src.register_script(HANDOFF), src.register_script(SETTLED)
            moved_here = 0
            for sid, kinds in sorted(self._movers(url).items()):
                to = self.new[shard_of(sid, len(self.new))]
                dst = self.client(to)
                rec, lease, final = (f"{self.prefix}:{{{sid}}}:{k}" for k in "slf")
                try:
                    if "s" in kinds:
                        status = handoff(keys=[rec, lease], args=[ONLINE_OWNER, ttl_ms])
                        what = status[0].decode()
                        if what == "held":
                            held += 1
                            continue
                        if what == "ok":
                            wrote = int(restores[to](
                                keys=[rec, lease, f"{self.prefix}:{{{sid}}}:a"],
                                args=[status[2], status[1], status[3], status[4], "", 0]))
                            if wrote:  # written, or arrived before: the old copy goes
                                settled(keys=[rec, lease])  # (the tombstone stays)
                            else:
                                log(f"  session {sid!r}: the new shard holds a session of "
                                    "that id opened there; the old one is left alone "
                                    "under its tombstone")
                            done[{1: "moved", 2: "there", 0: "conflicts"}[wrote]] += 1
                            moved_here += wrote == 1
                    if "f" in kinds and not dst.exists(final):
                        blob, ttl = src.dump(final), src.pttl(final)
                        if blob is not None:
                            try:
                                dst.restore(final, max(0, ttl), blob)
                                done["finals"] += 1
                            except ResponseError as exc:
                                if "BUSYKEY" not in str(exc):
                                    raise
                    if "f" in kinds:
                        src.delete(final)
                except RedisError as exc:
                    raise RnnserveError(
                        f"handing off session {sid!r} from {url} to its new shard: {exc}; "
                        f"{done['moved']} moved so far: run it again to finish") from None
            if moved_here:
                log(f"  {moved_here} session(s) from shard {i} ({url})")
        return done, held

    def clear(self) -> int:
        """Drop the tombstones of the sessions handed off; how many were dropped."""
        dropped = 0
        for url in self.old:
            drop = self.client(url).register_script(_DROP_TOMBSTONE)
            for sid, kinds in self._movers(url).items():
                if "l" in kinds:
                    try:
                        dropped += int(drop(keys=[f"{self.prefix}:{{{sid}}}:l"]))
                    except RedisError as exc:
                        raise RnnserveError(f"the store at {url}: {exc}") from None
        return dropped

    def end(self) -> None:
        """Every shard of both lists: the resharding ended (where it, or none, is under
        way)."""
        for url in self.shards:
            ended = self.client(url).register_script(_ENDED)
            try:
                ended(keys=[f"{self.prefix}:resharding"], args=[self.id])
            except RedisError as exc:
                raise RnnserveError(f"the store at {url}: {exc}") from None


def reshard_online(old: list[str], new: list[str], *, prefix: str = "rnnserve",
                   wait_s: float = 30.0, ttl_s: float = 300.0,
                   log: Callable[[str], None] = print) -> dict[str, int]:
    """Hand off, with every server running on ``new`` and ``--session-store-from old``,
    the sessions that are not on their new shard yet, then end the resharding: drop
    the tombstones and mark the shards for ``new`` (module doc). Sessions held by a
    live lease on an old shard (a server still on the old list writes them) are waited
    for up to ``wait_s``; if some still are, nothing is dropped nor marked and the error
    says so (run it again). It ends only after a pass that found nothing left to move."""
    r = OnlineResharder(old, new, prefix)
    try:
        r.check_marks()
        r.check_under_way()
        deadline = time.monotonic() + wait_s
        total: Counter[str] = Counter()
        busy = 0  # passes that still found sessions to move, none held
        while True:
            done, held = r.sweep(max(1, int(ttl_s * 1000)), log)
            total += done
            if not held and not done["moved"] and not done["finals"]:
                break  # a pass with nothing left to move
            if held:
                if time.monotonic() >= deadline:
                    break
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            else:
                busy += 1
                if busy >= 20:
                    raise RnnserveError(
                        "sessions keep arriving on the old shards (20 passes each found "
                        "more to move): a server on the old list alone still runs; stop it "
                        f"and run this again ({total['moved']} moved so far)")
        if held:
            raise RnnserveError(
                f"{held} session(s) to move are still written by servers on the old list "
                f"(their leases stayed live for {wait_s:g}s): restart every server with "
                f"--session-store {','.join(new)} --session-store-from {','.join(old)}, "
                f"then run this again ({total['moved']} moved so far; nothing is marked yet)")
        dropped = 0
        for _ in range(10):  # a server may hand off a session meanwhile: until none is left
            cleared = r.clear()
            dropped += cleared
            if not cleared:
                break
        r.end()
        r.mark(offline=False)
        log(f"handed off {total['moved']} session(s) ({total['there']} were on their new "
            f"shard already, {total['finals']} final answer(s) moved, {dropped} tombstone(s) "
            f"dropped, {total['conflicts']} left on both: an id opened on each); the shards "
            f"are marked for --session-store {','.join(new)}: the servers may drop "
            "--session-store-from")
        return {"moved": total["moved"], "there": total["there"], "finals": total["finals"],
                "dropped": dropped, "conflicts": total["conflicts"]}
    finally:
        r.close()

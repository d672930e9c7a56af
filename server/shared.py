"""The shared session store (Redis): sessions that outlive their server.

Every server keeps its live sessions in memory (``MemorySessionStore``) and, with a
shared store, writes each session's record (``server/records.py``) to Redis after each
step, before the step is answered: a client that got an answer can resume the session
on any replica, from exactly that point. The writes of one batch (and new sessions and
closes) go out together in one script call (group commit: while one call is in flight,
the next collects). Records of ``STAGE_MIN_BYTES`` or more are staged: sent ahead of
the call, with their replies off, under a key the script renames into place. That
call writes many sessions' keys, so a store is one Redis (with replicas if you like),
not a Redis Cluster; to go past what one Redis writes, list
several (``ShardedStore``): each session lives on one of them, picked by a hash of its
id, and a batch's writes go to its shards at once.

Per session these keys (their ``{id}`` hash tag keeps them in one slot):

- ``rnnserve:{id}:s``: a hash with ``seq`` (the next chunk's number), ``data`` (the
  record) and ``w`` (the server that created it or took it last), expiring after the
  idle timeout;
- ``rnnserve:{id}:l``: the lease, the id of the server that writes the session,
  expiring after ``lease_s`` unless a step renews it; a worker of ``serve --workers``
  writes ``server|index``, and its sibling workers may take the lease at once (the
  stored seq fences their steps) while other servers wait it out;
- ``rnnserve:{id}:f``: the record a session's last chunk left, for a minute;
- ``rnnserve:{id}:n:TAG``: a staged record (the hash ``:s`` becomes) between its
  write and the script call that renames it into place a moment later; one outlives
  that call only if the call did not run to its end (the connection dropped, Redis
  failed it), until it expires after the idle timeout. ``reshard`` leaves these (its
  pattern is ``{id}:?``);
- while resharding online (``MovingStore``): on a session's old shard the lease is the
  tombstone ``moved`` once the session was handed off to its new shard; there
  ``rnnserve:{id}:a`` says it arrived, for as long as the old copy may live.

Every write is a Lua script that checks the lease (another holder: ``SessionHeld``,
ABORTED, with the time left) and compares the stored ``seq`` with the one the step
started from (another server advanced the session: ``SessionMoved``, ABORTED), so two
servers can never interleave steps of one session nor write an older state over a
newer one. A write of steps served from memory while the store failed (degrade) may
start ahead of the stored seq, so the seq cannot fence it: ``w`` does. It is refused
(``SessionMoved``) once another server (or worker) took the session from the store, and
that server's line of steps stands. Redis errors and timeouts become
``StoreUnavailable`` (UNAVAILABLE): nothing waits longer than ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoPermissionError, NoScriptError, RedisError, ResponseError

from rnnserve.errors import StoreMisconfigured
from rnnserve.server.errors import (
    SessionExists,
    SessionHeld,
    SessionMoved,
    SessionRelocated,
    SessionTaken,
    StoreUnavailable,
    StoreUnsure,
)

log = logging.getLogger("rnnserve.shared")

# (operation, seconds, ok) for the metrics
StoreHook = Callable[[str, float, bool], None]

# The writes of one or more batches in one script call: new sessions, steps, closes.
# ARGV: owner, ttl ms, lease ms, upsert (1: a step may write a missing record, for
# servers that degrade while the store is down), key prefix, the online resharding this
# server takes part in ('' for none), the call's staging tag (below), then per write
# "KIND FROM TO ID" and the record.
# KIND: c creates (refused if the record exists), s steps from seq FROM to TO, f steps
# and ends the session (its record moves to the final key), d deletes (closes); S and F
# are s and f for a session served from memory while the store failed (degrade): its
# record may be behind, so any stored seq up to FROM will do, as long as no other server
# took the session since (w; the lease still decides who writes). The tombstone of an
# online resharding ('moved') refuses every write ('relocated'), but a create while no
# resharding other than this server's own is under way on the shard: the tombstone is
# then one left behind (``reshard --online`` drops them as it ends; a server of a
# resharding creates an id only on its shard of the new list, where that resharding
# leaves no tombstone of it), and a create is new data (a record under the tombstone
# still refuses it: 'exists'). The keys are built here from the ids (fewer arguments
# to pack: this is on every step's path). Returns the refusals only, flat: index,
# 'held', 'moved', 'taken', 'relocated' or 'exists', and the lease's time left or the
# stored seq.
# A write of kind c, s or S with an empty record is staged: its record was written just
# before, on the same connection, as the hash it becomes (seq, data, w: this server)
# under the staging key PREFIX:{ID}:n:TAG.I with the idle timeout's expiry, and is
# renamed into place here (RENAME keeps that expiry), or deleted if the write is
# refused. TAG is new for every call and I is the write's index in it, so two writes of
# one session in one call never share a key, and a staging key that a call cut short
# left behind is never taken for a later one's. A staged record that is not there
# (its write failed unseen, replies being off: out of memory; or evicted) refuses its
# write alone ('unstaged'). A record never passes through Lua then: Redis copies and
# hashes every byte of a script's arguments into Lua strings, which cost more than the
# rest of a step's write (docs/sessions.md, "How much one Redis writes"). A step (s)
# keeps the stored w. (A record is never empty: an empty one would read as staged.)
# A tombstone is one left behind (by a resharding that ended, or a hand-off that raced
# its end) when the shard records no resharding under way (none, or "done ID") other
# than the one this server takes part in (``mine``, '' for none). Both scripts below.
_LEFT_BEHIND = """
local function left_behind(marked, mine)
  return not marked or string.sub(marked, 1, 5) == 'done ' or marked == mine
end
"""

_WRITE_MANY = _LEFT_BEHIND + """
local function placed(stage, rec)  -- the staged record renamed into place, if it is there
  local r = redis.pcall('RENAME', stage, rec)
  return type(r) ~= 'table' or r.err == nil
end
local owner, ttl, lease, upsert, prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local resharding, tag = ARGV[6], ARGV[7]
local server = string.match(owner, '^(.*)|%d+$')
local failed = {}
local stale = nil  -- whether a tombstone here is one left behind (read once, if met)
for i = 0, (#ARGV - 7) / 2 - 1 do
  local kind, from, to, sid = string.match(ARGV[2 * i + 8], '^(%a) (%-?%d+) (%d+) (.*)$')
  local data = ARGV[2 * i + 9]
  local base = prefix .. ':{' .. sid .. '}:'
  local rec, lk = base .. 's', base .. 'l'
  local stage = data == '' and (kind == 'c' or kind == 's' or kind == 'S')
    and base .. 'n:' .. tag .. '.' .. i
  local refusals = #failed
  local holder = redis.call('GET', lk)
  local over = false  -- a create over a tombstone left behind
  if holder == 'moved' and kind == 'c' then
    if stale == nil then
      stale = left_behind(redis.call('GET', prefix .. ':resharding'), resharding)
    end
    if stale then holder, over = false, true end
  end
  local stored = redis.call('HMGET', rec, 'seq', 'w')
  local seq, writer = stored[1], stored[2]
  if holder and holder ~= owner
      and not (server and string.match(holder, '^(.*)|%d+$') == server) then
    table.insert(failed, i)
    if holder == 'moved' then  -- the tombstone of an online resharding
      table.insert(failed, 'relocated'); table.insert(failed, 0)
    else
      table.insert(failed, 'held'); table.insert(failed, redis.call('PTTL', lk))
    end
  elseif kind == 'c' then
    if seq then
      table.insert(failed, i); table.insert(failed, 'exists'); table.insert(failed, 0)
    elseif stage and not placed(stage, rec) then
      table.insert(failed, i); table.insert(failed, 'unstaged'); table.insert(failed, 0)
    else
      if not stage then
        redis.call('HSET', rec, 'seq', 0, 'data', data, 'w', owner)
        redis.call('PEXPIRE', rec, ttl)
      end
      redis.call('SET', lk, owner, 'PX', lease)
      redis.call('DEL', base .. 'f')
      -- what arrived here before is older than this session (as in RESTORE): an old
      -- copy handed off later is then a conflict to log, not dropped as arrived
      if over then redis.call('DEL', base .. 'a') end
    end
  elseif kind == 'd' then
    redis.call('DEL', rec, lk)
  elseif (kind == 'S' or kind == 'F') and seq and writer and writer ~= owner then
    table.insert(failed, i); table.insert(failed, 'taken'); table.insert(failed, seq)
  elseif seq ~= from and not (seq == false and upsert == '1')
      and not ((kind == 'S' or kind == 'F') and seq and tonumber(seq) <= tonumber(from)) then
    table.insert(failed, i); table.insert(failed, 'moved'); table.insert(failed, seq or -1)
  elseif kind == 'f' or kind == 'F' then
    redis.call('DEL', rec, lk)
    redis.call('SET', base .. 'f', data, 'PX', 60000)
  elseif stage and not placed(stage, rec) then  -- s or S, staged, and not there
    table.insert(failed, i); table.insert(failed, 'unstaged'); table.insert(failed, 0)
  elseif stage then  -- s or S, staged: renamed into place above
    if kind == 's' and writer ~= owner then  -- the stored w stands
      if writer then redis.call('HSET', rec, 'w', writer) else redis.call('HDEL', rec, 'w') end
    end
    redis.call('SET', lk, owner, 'PX', lease)
  elseif kind == 'S' then
    redis.call('HSET', rec, 'seq', to, 'data', data, 'w', owner)
    redis.call('PEXPIRE', rec, ttl)
    redis.call('SET', lk, owner, 'PX', lease)
  else
    redis.call('HSET', rec, 'seq', to, 'data', data)
    redis.call('PEXPIRE', rec, ttl)
    redis.call('SET', lk, owner, 'PX', lease)
  end
  if stage and #failed > refusals then redis.call('DEL', stage) end
end
return failed
"""

# KEYS: record, lease, the resharding under way. ARGV: owner, lease ms, the online
# resharding this server takes part in ('' for none). The record, with the lease taken
# (from this server's sibling worker too), and who had taken it before (w, then ours).
# A tombstone refuses it ('relocated'), but one with no record under it while no
# resharding other than this server's own is under way: one left behind, over nothing
# ('none', as for any id the store does not hold).
_ACQUIRE = _LEFT_BEHIND + """
local holder = redis.call('GET', KEYS[2])
local server = string.match(ARGV[1], '^(.*)|%d+$')
if holder == 'moved' and redis.call('EXISTS', KEYS[1]) == 0
    and left_behind(redis.call('GET', KEYS[3]), ARGV[3]) then
  return {'none', 0}
end
if holder and holder ~= ARGV[1]
    and not (server and string.match(holder, '^(.*)|%d+$') == server) then
  if holder == 'moved' then return {'relocated', 0} end
  return {'held', redis.call('PTTL', KEYS[2])}
end
local stored = redis.call('HMGET', KEYS[1], 'data', 'w')
if not stored[1] then return {'none', 0} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[1], 'w', ARGV[1])
return {'ok', stored[1], stored[2] or ''}
"""

# Online resharding (``MovingStore``, ``rnnserve reshard --online``). A session whose
# shard changes is handed off from its old shard: HANDOFF there, RESTORE on the new one.
#
# KEYS: record, lease (on the old shard). ARGV: owner, ttl ms. Unless another server
# holds the lease, the lease becomes the tombstone 'moved', for twice as long as the
# record or the idle timeout (a server on the previous list holds no copy longer): the
# record is kept until it is written on the new shard (a mover that dies before RESTORE
# leaves it to the next one, ``MovingStore``), but no server on the previous list reads
# or writes it any more (the scripts above answer 'relocated'). Returns the record, its
# seq, its time to live and w; 'held' with the lease's time left; or 'none'.
HANDOFF = """
local holder = redis.call('GET', KEYS[2])
local server = string.match(ARGV[1], '^(.*)|%d+$')
if holder and holder ~= 'moved' and holder ~= ARGV[1]
    and not (server and string.match(holder, '^(.*)|%d+$') == server) then
  return {'held', redis.call('PTTL', KEYS[2])}
end
local s = redis.call('HMGET', KEYS[1], 'seq', 'data', 'w')
if not s[1] then return {'none', 0} end
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then
  ttl = tonumber(ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if holder ~= 'moved' then
  redis.call('SET', KEYS[2], 'moved', 'PX', 2 * math.max(ttl, tonumber(ARGV[2])))
end
return {'ok', s[2], s[1], ttl, s[3] or ''}
"""

# KEYS: record, lease (on the old shard). The record of a session handed off (its
# lease the tombstone), once it is written on the new shard: the tombstone stays.
SETTLED = """
if redis.call('GET', KEYS[2]) == 'moved' then redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: record, lease, arrival (on the new shard). ARGV: seq, record, ttl ms, w, lease
# owner ('' for none), lease ms. Writes a handed-off record unless the new shard had
# one arrive already (the arrival key, kept as long as the old copy lives: a session
# that arrived and then ended here must not come back from its old copy), or has one
# of its own. Returns 1 if written, 2 if one arrived before (the old copy is stale),
# 0 if the shard holds a record that did not arrive (a session of that id opened here
# meanwhile: the old copy is left alone). A tombstone here is of an earlier resharding
# that moved the session away: what it left here is older than what comes back.
RESTORE = """
if redis.call('GET', KEYS[2]) == 'moved' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])  -- handed off from here before: stale
end
if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'data', ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'w', ARGV[4]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
if ARGV[5] ~= '' then redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[6]) end
return 1
"""

# The mark a shard dropped from the list by `rnnserve reshard` keeps: a server that
# still lists it is refused (``RedisStore._misplaced``), and none leaves its own mark
# there again, unless a resharding takes it into its new list.
RETIRED = "retired"

# KEYS: the mark of the store's place, the resharding under way. ARGV: the mark to
# leave where none is ('' for none), the id of the online resharding this server takes
# part in ('' for none): it is claimed where none is under way (none, or one ended:
# "done ID"), and the retired mark (RETIRED) where the mark may replace it ('' where
# not): only once that resharding is the one under way there (a refused claim leaves
# the shard retired). Returns both keys' values ('' for none).
_PLACED = """
local r = redis.call('GET', KEYS[2])
if ARGV[2] ~= '' and (not r or (string.sub(r, 1, 5) == 'done '
                                 and r ~= 'done ' .. ARGV[2])) then
  redis.call('SET', KEYS[2], ARGV[2])
  r = ARGV[2]
end
if ARGV[1] ~= '' then
  if ARGV[3] ~= '' and r == ARGV[2] and redis.call('GET', KEYS[1]) == ARGV[3] then
    redis.call('SET', KEYS[1], ARGV[1])
  else
    redis.call('SET', KEYS[1], ARGV[1], 'NX')
  end
end
return {redis.call('GET', KEYS[1]) or '', r or ''}
"""

# KEYS: lease. ARGV: owner. Only this owner's own lease: a worker's outdated copy
# must not let go of the lease its sibling took since.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


def _command(args: list[Any]) -> bytes:
    """A command in RESP (an array of bulk strings), packed in one join: the batch
    write is on every step's path, and redis-py's general packer costs several times
    more per call."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts += [b"$%d\r\n" % len(b), b, b"\r\n"]
    return b"".join(parts)


def _bulk(a: Any) -> bytes:
    b = a if isinstance(a, bytes) else str(a).encode()
    return b"$%d\r\n%s\r\n" % (len(b), b)


# One write of the batch-write script: kind, the seq it starts from, the next seq, the
# session's id and its record (b"" for a close).
_Write = tuple[str, int, int, str, bytes]
_Queued = tuple[list[_Write], "asyncio.Future[list[BaseException | None]]"]
_REPLY_OFF, _REPLY_ON = _command(["CLIENT", "REPLY", "OFF"]), _command(["CLIENT", "REPLY", "ON"])
_STAGED = "csS"  # the kinds whose records are staged (_WRITE_MANY)
# Records from this size on are staged: below it, the two commands more cost Redis and
# the server about what Lua's copy of the record does (docs/sessions.md)
STAGE_MIN_BYTES = 2048


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Handoff(NamedTuple):
    """A session's record as handed off by its old shard (``HANDOFF``)."""

    data: bytes
    seq: int
    ttl_ms: int
    writer: str  # w: the server that created or took it last


class Marks(NamedTuple):
    """The marks of its place (``PREFIX:shard``, "index/count") a store accepts, and the
    one it leaves where none is (None: it leaves none, and accepts none); ``reuse``: it
    leaves its mark where a shard is retired too (a shard an online resharding adds)."""

    claim: str | None
    accept: frozenset[str]
    reuse: bool = False


class RedisStore:
    def __init__(self, url: str, *, owner: str, ttl_s: float, lease_s: float,
                 timeout_s: float = 1.0, prefix: str = "rnnserve",
                 upsert: bool = False, on_op: StoreHook | None = None,
                 place: tuple[int, int] = (0, 1), marks: Marks | None = None,
                 resharding: str = "") -> None:
        """``owner``: this server's name in the leases; a worker of a server with
        several gives ``name|index`` (its siblings then share its leases, module doc).
        ``upsert``: a step may write the record of a session the store does not hold
        (one opened while the store was down, by a server that degrades). ``place``:
        this store's index in the servers' list of shards, and their count (``ping``);
        ``marks``: the marks of its place it accepts, when not only that place's, and
        ``resharding`` the id of the online resharding this server takes part in
        (``MovingStore``)."""
        self.url, self.owner, self.prefix = url, owner, prefix
        self.place = place
        self.resharding = resharding
        here = f"{place[0]}/{place[1]}"
        self.marks = marks or Marks(here, frozenset({here}))
        # whether the store's mark of its place was found right (``ping``); a store
        # that did not answer at start is checked before its first use, and one found
        # in another place refuses every use with ``_wrong``
        self._placed = False
        self._wrong: str | None = None
        self._placing = asyncio.Lock()  # one check at a time; the others wait for it
        self.ttl_ms, self.lease_ms = max(1, int(ttl_s * 1000)), max(1, int(lease_s * 1000))
        self.lease_s = self.lease_ms / 1000
        self.timeout_s = timeout_s
        self.upsert = upsert
        self._on_op = on_op
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s,
                                              socket_connect_timeout=timeout_s,
                                              retry_on_timeout=False)
        self._write_many_sha = hashlib.sha1(_WRITE_MANY.encode()).hexdigest()
        # the batch writes go over a connection of their own, one at a time, without
        # the pool, the script wrapper and the general packer (a quarter of the cost)
        self._writer: AbstractConnection | None = None
        # whether that connection stages records (``_WRITE_MANY``): it sends them with
        # their replies off (CLIENT REPLY), which an ACL may refuse; None: to be checked
        # (again after each failure: the connection is made anew)
        self._staging: bool | None = None
        # staging tags: this store's own, random, and a count of its calls
        self._stage_id, self._stage_calls = secrets.token_hex(8), 0
        self._key_head = f"{prefix}:{{".encode()
        self._stage_w = b"\r\n$1\r\nw\r\n" + _bulk(owner) + b"*3\r\n$7\r\nPEXPIRE\r\n"
        self._stage_ttl = _bulk(self.ttl_ms)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._release = self._redis.register_script(_RELEASE)
        self._handoff = self._redis.register_script(HANDOFF)
        self._restore = self._redis.register_script(RESTORE)
        self._settled = self._redis.register_script(SETTLED)
        self._placed_script = self._redis.register_script(_PLACED)
        # batches of writes waiting for the next call, each with its future
        self._queue: list[_Queued] = []
        self._writing = False  # a batch write is in flight
        self._flushing: asyncio.Task[None] | None = None

    def _keys(self, sid: str) -> list[str]:
        base = f"{self.prefix}:{{{sid}}}"
        return [f"{base}:s", f"{base}:l", f"{base}:f"]

    async def _call(self, op: str, fn: Callable[[], Any], placed: bool = False) -> Any:
        """``fn``'s call, timed and bounded; Redis's errors become ``StoreUnavailable``.
        First the store's place is checked if it has not been (``placed``: the check's
        own call)."""
        started = time.perf_counter()
        ok = False
        try:
            if not (placed or self._placed):  # a refusal counts as a failed operation
                await self._place_checked()
            async with asyncio.timeout(self.timeout_s):
                result = await fn()
            ok = True
            return result
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"the session store at {self.url} did not answer "
                                   f"({exc.__class__.__name__}); try again") from None
        finally:
            if self._on_op is not None:
                self._on_op(op, time.perf_counter() - started, ok)

    async def ping(self, claim: bool = True) -> None:
        """The store answers and is shard ``place`` (index, count) of the servers' list
        of shards (one store: the only one). The first server to reach it leaves a mark
        of its place (the key ``PREFIX:shard``, "index/count"); a server whose list
        differs (another order, another length, one store where there were several)
        gets ``StoreMisconfigured``: it would look for sessions where they are not.
        A store that does not answer now is checked so before its first use. ``claim``:
        also claim this server's online resharding here (else ``claim_resharding``)."""
        self._placed = False
        await self._place_checked(StoreMisconfigured, claim)

    def _misplaced(self, found: str | None, under_way: str | None,
                   marks_only: bool = False) -> str | None:
        """Why this store is not where this server looks for it (None if it is).
        ``marks_only``: the mark of its place alone counts, not an online resharding
        that started after this server did (``recheck``: a server still on the old list
        serves on while it runs, refused each session handed off)."""
        want = f"{self.place[0]}/{self.place[1]}"
        claim, accept, reuse = self.marks
        changed = marks_only and self._placed  # a check of a store found in place
        if found == RETIRED:
            if claim is None and under_way == f"done {self.resharding}":
                return None  # an old shard this server's own resharding dropped
            if reuse and not changed:
                return None  # a shard this resharding adds: its claim takes it again
            return (f"the session store at {self.url} was dropped from its servers' list "
                    "of shards by `rnnserve reshard` (its key "
                    f"{self.prefix}:shard is {RETIRED!r}), but this server still lists it "
                    f"as shard {want} (index/count): run it with the shards the other "
                    "servers run with now. A resharding that lists that Redis among its "
                    "new shards takes it again")
        if under_way is not None and not under_way.startswith("done ") \
                and under_way != self.resharding and not marks_only:
            return (f"the session store at {self.url} is being resharded online "
                    f"({under_way}) and this server "
                    + (f"runs another resharding ({self.resharding})"
                       if self.resharding else "does not take part")
                    + ": until `rnnserve reshard --online` ends it, every server must "
                    "run with the same --session-store NEW and --session-store-from OLD "
                    "(docs/sessions.md, \"Resharding online\")")
        ours = (self.resharding, f"done {self.resharding}")
        if changed and found == claim != want and under_way not in ours:
            accept = accept - {found}  # a later reshard gave it the old place again
        if not (found in accept or (found is None and claim is None)):
            return (f"the session store at {self.url} is shard {found} (index/count) of "
                    f"its servers' list of shards, but this server lists it as {want}"
                    + (f" (and, resharding, accepts {' or '.join(sorted(accept))})"
                       if accept != {want} else "")
                    + (": the list was changed (`rnnserve reshard`) since this server "
                       "started; run it with the list the other servers run with now"
                       if changed else
                       ": every server must list the same shards in the same order. To "
                       "change the list, run `rnnserve reshard --from OLD --to NEW`: it "
                       "moves the sessions the new list puts elsewhere (with the servers "
                       "stopped, or online with --online; docs/sessions.md)"))
        return None

    async def read_place(self, claim_mark: str = "", claim_resharding: str = "",
                         reuse: bool = False) -> tuple[str | None, str | None]:
        """The mark of the store's place and the resharding under way (``_PLACED``);
        ``reuse``: ``claim_mark`` replaces a retired mark too."""
        keys = [f"{self.prefix}:shard", f"{self.prefix}:resharding"]
        got = await self._call("ping", lambda: self._placed_script(
            keys=keys, args=[claim_mark, claim_resharding, RETIRED if reuse else ""]),
            placed=True)
        found, under_way = (_text(v) or None for v in got)
        return found, under_way

    async def _place_checked(self, wrong: type[Exception] = StoreUnavailable,
                             claim: bool = True) -> None:
        """Check the store's mark of its place once (``ping``), and that no online
        resharding but this server's own (``resharding``) is under way on it, then
        (``claim``) claim that one; a store in another place, or in another resharding,
        raises ``wrong`` now and ``StoreUnavailable`` on every use after: nothing of
        this server's sessions is read from it or written to it."""
        async with self._placing:
            if self._wrong is not None:
                raise wrong(self._wrong)
            if self._placed:
                return
            found, under_way = await self.read_place(self.marks.claim or "")
            why = self._misplaced(found, under_way)
            if why is None and claim:
                why = await self._claimed(found, under_way)
            self._placed = why is None
        if why is not None:
            self._wrong = why
            log.error("%s", self._wrong)
            raise wrong(self._wrong)

    async def recheck(self) -> str | None:
        """Read the store's mark of its place again, writing nothing: why this server
        must no longer use it, when a reshard gave the shards another list since the
        server started (``--store-check-s``); None when the mark is one it accepts,
        when there is none (a Redis that lost its data: the next server to start marks
        it), or when the store does not answer (that is for its uses to tell)."""
        try:
            found, under_way = await self.read_place()
        except StoreUnavailable:
            return None
        return None if found is None else self._misplaced(found, under_way, marks_only=True)

    async def _claimed(self, found: str | None, under_way: str | None) -> str | None:
        """Claim this server's online resharding here, if it takes part in one that is
        not claimed yet, and this server's mark where the store is retired (a shard the
        resharding adds: ``Marks.reuse``); why not, if another was claimed meanwhile."""
        retired = found == RETIRED
        if not retired and (not self.resharding
                            or under_way in (self.resharding, f"done {self.resharding}")):
            return None
        found, under_way = await self.read_place(self.marks.claim or "", self.resharding,
                                                 reuse=retired)
        return self._misplaced(found, under_way)

    async def claim_resharding(self) -> None:
        """Claim this server's online resharding on a store whose place was checked
        (``ping(claim=False)``); ``StoreMisconfigured`` if another was claimed meanwhile."""
        async with self._placing:
            if not self._placed:
                return  # checked (and claimed) before its first use
            try:
                found, under_way = await self.read_place()
                why = await self._claimed(found, under_way)
            except StoreUnavailable:
                self._placed = False  # so checked and claimed before its first use
                raise
            if why is not None:
                self._placed = False
                self._wrong = why
                log.error("%s", why)
                raise StoreMisconfigured(why)

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.disconnect()
        await self._redis.aclose()

    async def _write(self, writes: list[_Write]) -> Any:
        """One call of the batch-write script on the writer connection, its records
        staged before it where the connection can; the script is loaded again if Redis
        lost it (a restart). A failed or interrupted call drops the connection: its
        reply, if one comes, must not be read as the next one's."""
        if self._writer is None:
            self._writer = await self._redis.connection_pool.get_connection()
        conn = self._writer
        try:
            if self._staging is None:
                self._staging = await self._replies_off(conn)
            packed = self._packed(writes)
            try:
                await conn.send_packed_command(packed, check_health=False)
                if len(packed) > 1 and _text(await conn.read_response()) != "OK":
                    raise RedisError("CLIENT REPLY ON was not answered OK")
                result = await conn.read_response()
            except NoScriptError:  # the staged records are there: only the call again
                await conn.send_packed_command([_command(["SCRIPT", "LOAD", _WRITE_MANY])])
                await conn.read_response()
                await conn.send_packed_command(packed[-1:])
                result = await conn.read_response()
            if not isinstance(result, list):
                raise RedisError(f"the write script answered {type(result).__name__}, "
                                 "not a list")
            return result
        except BaseException:
            self._staging = None  # checked again on the new connection
            await conn.disconnect()
            raise

    async def _replies_off(self, conn: AbstractConnection) -> bool:
        """Whether ``conn`` turns its replies off when asked (CLIENT REPLY), to stage
        records with no reply to read for each: an ECHO between OFF and ON must go
        unanswered. Where an ACL refuses the command, or the server ignores it, the
        records go through the script, as before (a warning says so); other errors
        raise (and the next write checks again)."""
        nonce = secrets.token_hex(4)
        await conn.send_packed_command(
            [_REPLY_OFF, _command(["ECHO", "off"]), _REPLY_ON, _command(["ECHO", nonce])],
            check_health=False)
        try:
            first, second = _text(await conn.read_response()), \
                _text(await conn.read_response())
        except ResponseError as exc:
            await conn.disconnect()  # the other replies, unread
            if not (isinstance(exc, NoPermissionError) or "unknown" in str(exc).lower()):
                raise
            why = str(exc)
        else:
            if (first, second) == ("OK", nonce):
                return True
            await conn.disconnect()
            why = f"replies went on: {first!r}, {second!r}"
        log.warning("the session store at %s does not take CLIENT REPLY OFF (%s): each "
                    "step's record goes through the write script, which costs Redis more",
                    self.url, why)
        return False

    def _packed(self, writes: list[_Write]) -> list[bytes]:
        """The batch write as sent: with staging, each large record's staging commands
        (a hash as the record becomes, with the idle timeout's expiry), replies off;
        then the script call, last. Packed here, not by ``_command``: this is on every
        step's path."""
        staging = self._staging
        parts = [_REPLY_OFF]
        call = [b""]  # the script call: its head goes first once the count is known
        self._stage_calls += 1
        tag = f"{self._stage_id}.{self._stage_calls}"
        head_key, tail_key = self._key_head, f"}}:n:{tag}.".encode()
        for i, (kind, start, to, sid, data) in enumerate(writes):
            head = f"{kind} {start} {to} {sid}".encode()
            if staging and kind in _STAGED and len(data) >= STAGE_MIN_BYTES:
                key = b"%s%s%s%d" % (head_key, sid.encode(), tail_key, i)
                key = b"$%d\r\n%s\r\n" % (len(key), key)
                seq = b"%d" % to
                parts += [b"*8\r\n$4\r\nHSET\r\n%s$3\r\nseq\r\n$%d\r\n%s\r\n"
                          b"$4\r\ndata\r\n$%d\r\n" % (key, len(seq), seq, len(data)),
                          data, self._stage_w, key, self._stage_ttl]
                call.append(b"$%d\r\n%s\r\n$0\r\n\r\n" % (len(head), head))
            else:
                call += [b"$%d\r\n%s\r\n$%d\r\n" % (len(head), head, len(data)), data, b"\r\n"]
        fixed = [self.owner, self.ttl_ms, self.lease_ms, 1 if self.upsert else 0, self.prefix,
                 self.resharding, tag]
        call[0] = _command(["EVALSHA", self._write_many_sha, 0, *fixed]).replace(
            b"*10\r\n", b"*%d\r\n" % (10 + 2 * len(writes)), 1)
        if len(parts) > 1:
            parts.append(_REPLY_ON)
        else:
            parts.clear()
        parts.append(b"".join(call))
        return parts

    def _check(self, sid: str, status: list[Any]) -> Any:
        kind = _text(status[0])
        if kind == "held":
            left = max(0, int(status[1])) / 1000
            raise SessionHeld(f"session {sid!r} is being written by another server (its lease "
                              f"ends in {left:.1f}s unless renewed); retry after that")
        if kind == "moved":
            at = int(_text(status[1]))
            if at < 0:
                raise SessionMoved(f"the session store no longer holds session {sid!r} (it "
                                   "ended or expired there, or the store lost its data)")
            raise SessionMoved(f"session {sid!r} was advanced elsewhere (the store is at "
                               f"chunk {at}); resume it to continue from there")
        if kind == "taken":
            raise SessionTaken(f"session {sid!r} was taken from the session store by another "
                               "server while this one served it from memory (the store is "
                               f"at chunk {_text(status[1])}); its steps there stand: resume "
                               "it to continue from the store")
        if kind == "relocated":
            raise SessionRelocated(
                f"session {sid!r} was moved to another shard of the session store by an "
                "online resharding, and this server still runs with the previous list of "
                "shards: reach a server that runs with the new list (--session-store NEW "
                "--session-store-from OLD)")
        if kind == "unstaged":
            raise StoreUnavailable(f"the session store at {self.url} did not keep session "
                                   f"{sid!r}'s record until it was written (out of memory, "
                                   "or evicted); try again")
        if kind == "exists":
            raise SessionExists(f"session {sid!r} already exists in the shared store; resume "
                                "it or pick another id")
        return status[1]

    async def create(self, sid: str, data: bytes) -> None:
        """Store a new session's first record and take its lease; ``SessionExists`` if
        the store has one. Goes out with the batch writes: a burst of new sessions is
        a few script calls on one connection, not a connection and a call each."""
        refused = (await self._submit([("c", -1, 0, sid, data)]))[0]
        if refused is not None:
            raise refused

    async def acquire(self, sid: str) -> tuple[bytes, bool] | None:
        """The session's record with its lease taken for this server, and whether
        another server (or worker) had taken it from the store since this one created
        or took it (a copy held here is then not its line of steps any more); None if
        there is none (never created, closed, or expired in the store)."""
        keys = [*self._keys(sid)[:2], f"{self.prefix}:resharding"]
        status = await self._call("load", lambda: self._acquire(
            keys=keys, args=[self.owner, self.lease_ms, self.resharding]))
        if _text(status[0]) == "none":
            return None
        data = bytes(self._check(sid, status))
        writer = _text(status[2])
        return data, writer not in ("", self.owner)

    async def peek(self, sid: str) -> bytes | None:
        """The session's record as stored, its lease and writer untouched (None if there
        is none): to check who owns it before taking it."""
        key = self._keys(sid)[0]
        data = await self._call("load", lambda: self._redis.hget(key, "data"))
        return None if data is None else bytes(data)

    async def settle(self, sid: str) -> None:
        """Delete the record of a session handed off from here, once it is written on
        its new shard (its tombstone stays: ``SETTLED``)."""
        keys = self._keys(sid)[:2]
        await self._call("move", lambda: self._settled(keys=keys))

    async def handoff(self, sid: str) -> Handoff | None:
        """The session's record, handed off to be restored on its new shard (resharding
        online: ``HANDOFF``); None if there is none. ``SessionHeld`` while another
        server holds its lease."""
        keys = self._keys(sid)[:2]
        status = await self._call("move", lambda: self._handoff(
            keys=keys, args=[self.owner, self.ttl_ms]))
        if _text(status[0]) == "none":
            return None
        data = bytes(self._check(sid, status))
        return Handoff(data, int(_text(status[2])), int(status[3]), _text(status[4]))

    async def restore(self, sid: str, moved: Handoff, lease: bool) -> int:
        """Write a handed-off record here (with this server's lease when ``lease``) unless
        this store holds one already: 1 if written, 2 if one arrived here before, 0 if
        this store holds a session of that id that did not arrive (``RESTORE``)."""
        keys = [*self._keys(sid)[:2], f"{self.prefix}:{{{sid}}}:a"]
        writer = self.owner if lease else moved.writer
        return int(await self._call("move", lambda: self._restore(
            keys=keys, args=[moved.seq, moved.data, moved.ttl_ms, writer,
                             self.owner if lease else "", self.lease_ms])))

    async def final(self, sid: str) -> bytes | None:
        """The record a session's last chunk left (for a minute), for a retry of it."""
        key = self._keys(sid)[2]
        data = await self._call("load", lambda: self._redis.get(key))
        return None if data is None else bytes(data)

    async def delete(self, sid: str) -> None:
        """Delete a closed session's record (``SessionHeld`` if another server has it)."""
        refused = (await self._submit([("d", 0, 0, sid, b"")]))[0]
        if refused is not None:
            raise refused

    async def release(self, sids: Iterable[str]) -> None:
        """Give up the leases this server holds (on shutdown, expiry or eviction)."""
        sids = list(sids)
        if not sids:
            return

        async def run() -> None:
            pipe = self._redis.pipeline(transaction=False)
            for sid in sids:
                await self._release(keys=[self._keys(sid)[1]], args=[self.owner], client=pipe)
            await pipe.execute()

        await self._call("release", run)

    async def checkpoint_many(self, steps: list[tuple[str, bytes, int, int, bool, bool]]
                              ) -> list[BaseException | None]:
        """Write the records of steps (session id, record, the seq it started from, the
        next seq, whether it ended the session, whether the stored record may be behind
        the seq it started from), each fenced by its lease and sequence number; returns
        once they are in Redis, per step None or why it was refused (``SessionHeld``,
        ``SessionMoved``). Raises ``StoreUnavailable``.

        One write is in flight at a time: with none, the caller writes at once (no task,
        no extra turn of the event loop on every step's path); batches that finish
        meanwhile queue and go out together in the next script call (group commit).

        If the caller is cancelled meanwhile, the writes may still land: the store is
        then one chunk ahead of this server's copy, which the core therefore refreshes
        from the store before the session's next step (``Core._give_up``)."""
        return await self._submit([
            (("F" if final else "S") if behind else ("f" if final else "s"),
             from_seq, to_seq, sid, data)
            for sid, data, from_seq, to_seq, final, behind in steps])

    async def _submit(self, writes: list[_Write]) -> list[BaseException | None]:
        """Write now if no write is in flight, else with the next one."""
        if self._writing:
            fut: asyncio.Future[list[BaseException | None]] = \
                asyncio.get_running_loop().create_future()
            self._queue.append((writes, fut))
            return await fut
        self._writing = True
        try:
            return (await self._write_batch([writes]))[0]
        finally:
            if self._queue:
                self._flushing = asyncio.get_running_loop().create_task(self._flush())
            else:
                self._writing = False

    async def _flush(self) -> None:
        """Write what queued while a write was in flight, until nothing is left."""
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    results = await self._write_batch([writes for writes, _ in batch])
                except StoreUnavailable as exc:
                    for *_, fut in batch:
                        if not fut.done():
                            fut.set_exception(StoreUnavailable(str(exc)))
                    continue
                for (*_, fut), refused in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(refused)
        finally:
            self._flushing = None
            self._writing = False

    async def _write_batch(self, batches: list[list[_Write]]
                           ) -> list[list[BaseException | None]]:
        """One script call for several batches; per batch, per write, why it was refused."""
        writes = [w for batch in batches for w in batch]
        results = await self._call("write", lambda: self._write(writes))
        refused: dict[int, BaseException] = {}
        for i in range(0, len(results), 3):
            at = int(results[i])
            try:
                self._check(writes[at][3], results[i + 1:i + 3])
            except Exception as exc:
                refused[at] = exc
        out, at = [], 0
        for batch in batches:
            out.append([refused.get(i) for i in range(at, at + len(batch))])
            at += len(batch)
        return out


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash (Lamping and Veach, 2014): the bucket in ``range(buckets)``
    of a 64-bit key. Growing ``buckets`` by one moves only the keys that land in the new
    bucket (about 1/(n+1) of them); no others change bucket."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def shard_of(sid: str, shards: int) -> int:
    """The shard (0 .. shards-1) that holds session ``sid``'s keys: the same on every
    server configured with the same number of shards."""
    key = int.from_bytes(hashlib.blake2b(sid.encode(), digest_size=8).digest(), "little")
    return jump_hash(key, shards)


class ShardedStore:
    """Sessions spread over several Redis servers (shards), each session's keys on one
    of them, picked by a hash of its id (``shard_of``): one Redis runs every write
    script of the sessions it holds on one core, so several lift the ceiling of one
    (about 45,000 speech-small step writes a second, docs/sessions.md). Every server
    must list the same shards in the same order; ``ping`` checks a mark each shard
    keeps of its place (``RedisStore.ping``); ``rnnserve reshard`` moves the sessions
    to a new list (``server/reshard.py``).

    The interface is ``RedisStore``'s. A batch's writes are split by shard and go out
    to the shards together (each with its own group commit); a shard that cannot be
    reached fails only its own sessions' writes (``StoreUnavailable`` in their places),
    the others land."""

    def __init__(self, urls: list[str], *, owner: str, ttl_s: float, lease_s: float,
                 timeout_s: float = 1.0, prefix: str = "rnnserve", upsert: bool = False,
                 on_op: Callable[[int], StoreHook | None] | None = None,
                 marks: list[Marks] | None = None, resharding: str = "") -> None:
        """``on_op``: given a shard's index, the hook of its operations (for metrics);
        ``marks``: per shard, the marks of its place it accepts, and ``resharding`` the
        online resharding this server takes part in (``RedisStore``)."""
        if len(urls) < 2 or len(set(urls)) != len(urls):
            raise ValueError(f"a sharded store needs two or more distinct URLs, got {urls}")
        self.shards = [RedisStore(url, owner=owner, ttl_s=ttl_s, lease_s=lease_s,
                                  timeout_s=timeout_s, prefix=prefix, upsert=upsert,
                                  on_op=None if on_op is None else on_op(i),
                                  place=(i, len(urls)),
                                  marks=None if marks is None else marks[i],
                                  resharding=resharding)
                       for i, url in enumerate(urls)]
        self.lease_s = self.shards[0].lease_s
        self._where: dict[str, int] = {}  # shard_of's answers, for the ids live here

    def index(self, sid: str) -> int:
        """The index of the shard that holds session ``sid``."""
        i = self._where.get(sid)
        if i is None:
            i = shard_of(sid, len(self.shards))
            if len(self._where) >= 1 << 20:  # a bound, not an eviction policy: the ids
                self._where.clear()          # are cheap to hash again
            self._where[sid] = i
        return i

    def shard(self, sid: str) -> RedisStore:
        """The shard that holds session ``sid``."""
        return self.shards[self.index(sid)]

    async def ping(self) -> None:
        """Every shard answers and holds its own place in this list (``RedisStore.ping``:
        ``StoreMisconfigured`` if not); ``StoreUnavailable`` names the shards that did
        not answer."""
        results = await asyncio.gather(*(s.ping() for s in self.shards),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, StoreUnavailable):
                raise r
        failed = [r for r in results if isinstance(r, StoreUnavailable)]
        if failed:
            raise StoreUnavailable("; ".join(str(e) for e in failed))

    async def recheck(self) -> str | None:
        """``RedisStore.recheck`` of every shard: the first shard's reason, if any."""
        return await _first_reason(self.shards)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.shards))

    async def create(self, sid: str, data: bytes) -> None:
        await self.shard(sid).create(sid, data)

    async def acquire(self, sid: str) -> tuple[bytes, bool] | None:
        return await self.shard(sid).acquire(sid)

    async def peek(self, sid: str) -> bytes | None:
        return await self.shard(sid).peek(sid)

    async def final(self, sid: str) -> bytes | None:
        return await self.shard(sid).final(sid)

    async def delete(self, sid: str) -> None:
        await self.shard(sid).delete(sid)
        self._where.pop(sid, None)

    async def release(self, sids: Iterable[str]) -> None:
        """Give up the leases, each shard's in one call, the shards together; raises the
        first shard's ``StoreUnavailable`` after all have been tried."""
        parts: dict[int, list[str]] = {}
        for sid in sids:
            parts.setdefault(self.index(sid), []).append(sid)
            self._where.pop(sid, None)
        results = await asyncio.gather(*(self.shards[i].release(ids)
                                         for i, ids in parts.items()), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def checkpoint_many(self, steps: list[tuple[str, bytes, int, int, bool, bool]]
                              ) -> list[BaseException | None]:
        """``RedisStore.checkpoint_many`` over the shards: the writes of each shard in
        one call, the shards' calls at once; a shard that fails gives its writes
        ``StoreUnavailable`` (they may land all the same), the others stand."""
        parts: dict[int, list[int]] = {}
        where = self._where
        for k, step in enumerate(steps):
            i = where.get(step[0])
            parts.setdefault(self.index(step[0]) if i is None else i, []).append(k)
        if len(parts) == 1:
            (i, _), = parts.items()
            return await self._part(self.shards[i], steps)
        results: list[BaseException | None] = [None] * len(steps)
        done = await asyncio.gather(*(self._part(self.shards[i], [steps[k] for k in ks])
                                      for i, ks in parts.items()))
        for ks, got in zip(parts.values(), done, strict=True):
            for k, why in zip(ks, got, strict=True):
                results[k] = why
        return results

    @staticmethod
    async def _part(shard: RedisStore, steps: list[tuple[str, bytes, int, int, bool, bool]]
                    ) -> list[BaseException | None]:
        try:
            return await shard.checkpoint_many(steps)
        except StoreUnavailable as exc:
            return [StoreUnavailable(str(exc)) for _ in steps]


async def _first_reason(stores: Iterable[RedisStore]) -> str | None:
    reasons = await asyncio.gather(*(s.recheck() for s in stores))
    return next((r for r in reasons if r is not None), None)


def resharding_id(previous: list[str], urls: list[str]) -> str:
    """The name of an online resharding from the shards ``previous`` to ``urls``: the
    same on every server (and ``rnnserve reshard --online``) given the same lists."""
    digest = hashlib.blake2b("\n".join([*previous, ">", *urls]).encode(), digest_size=6)
    return f"{len(previous)}>{len(urls)} shards {digest.hexdigest()}"


class MovingStore:
    """The shared store while its list of shards changes online (``--session-store NEW
    --session-store-from OLD``; docs/sessions.md, "Resharding online"). Sessions live on
    the shards of the new list; one that the new list puts on another shard than the
    old one did, and that is not there yet, is handed off from its old shard when this
    server loads it or opens its id (``HANDOFF`` there, ``RESTORE`` here, then the old
    record is dropped, ``SETTLED``), after which servers still on the old list are
    refused it (``SessionRelocated``): no session is ever written on two shards.
    ``rnnserve reshard --online`` hands off the rest.

    The interface is ``RedisStore``'s; writes, releases and deletes go to the new list
    alone (this server holds only sessions it created or loaded there). The shards'
    marks of their place may be of either list until ``reshard --online`` ends; every
    shard of both lists carries the resharding's id (``resharding_id``) until then, so
    that a server on other lists, or on one list alone, does not start."""

    def __init__(self, urls: list[str], previous: list[str], *, owner: str, ttl_s: float,
                 lease_s: float, timeout_s: float = 1.0, prefix: str = "rnnserve",
                 upsert: bool = False,
                 on_op: Callable[[int | str], StoreHook | None] | None = None) -> None:
        if urls == previous:
            raise ValueError("the previous list of shards is the list itself")
        self.urls, self.previous = urls, previous
        n, m = len(urls), len(previous)
        self.resharding = resharding_id(previous, urls)

        def mark(i: int, count: int) -> str:
            return f"{i}/{count}"

        new_marks = []  # a shard of both lists keeps its old mark until the end
        for i, url in enumerate(urls):
            here = mark(i, n)
            if url in previous:
                old = mark(previous.index(url), m)
                new_marks.append(Marks(old, frozenset({here, old})))
            else:  # added by this resharding: it may be one an earlier one dropped
                new_marks.append(Marks(here, frozenset({here}), reuse=True))
        kw: dict[str, Any] = dict(owner=owner, ttl_s=ttl_s, lease_s=lease_s,
                                  timeout_s=timeout_s, prefix=prefix,
                                  resharding=self.resharding)
        self.new = _open(urls, upsert=upsert, on_op=on_op, marks=new_marks, **kw)
        # the new list as a plain store, for a server started after the resharding ended
        self._plain = lambda: _open(urls, upsert=upsert, on_op=on_op,
                                    **{**kw, "resharding": ""})
        self.old = {  # read and handed off only; a shard dropped from the list loses
            url: RedisStore(  # its mark when the resharding ends
                url, on_op=None if on_op is None else on_op(f"from{j}"), place=(j, m),
                marks=Marks(None, frozenset({mark(j, m)} | ({mark(urls.index(url), n)}
                                                             if url in urls else set()))),
                **kw)
            for j, url in enumerate(previous)}
        self.lease_s: float = self.new.lease_s
        self.owner = owner
        self._done = False  # the resharding ended (seen when an old shard failed)

    def _from(self, sid: str) -> RedisStore | None:
        """The session's shard on the previous list, where that is not its shard now
        and the resharding has not ended."""
        if self._done:
            return None
        was = self.previous[shard_of(sid, len(self.previous))]
        return None if was == self.urls[shard_of(sid, len(self.urls))] else self.old[was]

    def _to(self, sid: str) -> RedisStore:
        return self.new.shard(sid) if isinstance(self.new, ShardedStore) else self.new

    async def ping(self) -> None:
        """Every shard of both lists answers, holds its place in its list and takes part
        in no other resharding (``RedisStore.ping``: ``StoreMisconfigured`` if not), and
        only then is this one claimed on them: a server misconfigured leaves no trace. A
        shard that does not answer is checked (and claimed) before its first use
        (``StoreUnavailable`` names it). A server started after the resharding ended
        (a shard of the new list says so) serves the new list as a plain store: it
        leaves a shard that lost its data the new list's mark, not the old one's, and
        claims no resharding there again."""
        if await self._ended_on([*self._new_stores(), *self.old.values()]):
            await self.new.close()
            self.new = self._plain()
            await self.new.ping()
            return
        stores = [*self._new_stores(), *self.old.values()]
        results = await asyncio.gather(*(s.ping(claim=False) for s in stores),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, StoreUnavailable):
                raise r
        claimed = await asyncio.gather(*(s.claim_resharding() for s, r in zip(
            stores, results, strict=True) if r is None), return_exceptions=True)
        for r in claimed:
            if isinstance(r, BaseException) and not isinstance(r, StoreUnavailable):
                raise r
        failed = [str(r) for r in [*results, *claimed] if isinstance(r, StoreUnavailable)]
        if failed:
            raise StoreUnavailable("; ".join(failed))

    async def recheck(self) -> str | None:
        """``RedisStore.recheck`` of every shard of both lists, of the new one alone
        once the resharding has ended (the old shards may be gone then)."""
        stores = self._new_stores()
        if not self._done:
            await self._ended_on(stores)
        return await _first_reason([*stores, *(() if self._done else self.old.values())])

    def _new_stores(self) -> list[RedisStore]:
        return self.new.shards if isinstance(self.new, ShardedStore) else [self.new]

    async def _ended_on(self, stores: list[RedisStore]) -> bool:
        """Whether the resharding ended (``reshard --online`` writes "done ID") as one
        of these shards says (one that lost its data, or does not answer, cannot):
        then the old shards may be gone for good."""
        for store in stores:
            try:
                found, under_way = await store.read_place()
            except StoreUnavailable:
                continue
            # a retired shard of the new list (a resharding repeated after a reshard
            # back) keeps an earlier end's record; an old one keeps this end's
            if under_way == f"done {self.resharding}" and (found != RETIRED
                                                           or store.marks.claim is None):
                self._done = True
                log.info("the online resharding %s has ended: the old list of shards is "
                         "not looked at any more (drop --session-store-from)",
                         self.resharding)
                return True
        return False

    async def close(self) -> None:
        await asyncio.gather(self.new.close(), *(s.close() for s in self.old.values()))

    async def _hand_off(self, src: RedisStore, sid: str, lease: bool) -> Handoff | None:
        """Hand the session off from its old shard ``src`` to its new one, if it is
        still there (None if not): its record is written on the new shard (with this
        server's lease when ``lease``) unless that holds it or held it already, and then
        dropped from the old one. ``SessionHeld`` while a server on the old list holds
        it. A shard that does not answer gives ``StoreUnsure``: whether the session is
        still on its old shard cannot be told, and a server that degrades must not
        serve it (or its id) from memory meanwhile; unless the resharding has ended
        (``reshard --online``), after which the old shards are not looked at again."""
        dst = self._to(sid)
        try:
            moved = await src.handoff(sid)
            if moved is None:
                return None
            wrote = await dst.restore(sid, moved, lease=lease)
        except StoreUnavailable as exc:
            if await self._ended_on([dst]):
                return None
            raise StoreUnsure(f"{exc} (session {sid!r} is being moved to another shard by "
                              "an online resharding)") from None
        if wrote:
            try:  # the old copy is inert under its tombstone: the sweep drops it else
                await src.settle(sid)
            except StoreUnavailable as exc:
                log.warning("session %r: its old record stays on %s until `rnnserve "
                            "reshard --online` drops it (%s)", sid, src.url, exc)
        else:
            log.warning("session %r is on %s and on %s, opened on each: the old one is "
                        "left alone under its tombstone", sid, dst.url, src.url)
        if wrote == 1:
            log.info("session %r handed off from %s to %s (resharding)", sid, src.url,
                     dst.url)
            return moved
        return None

    async def create(self, sid: str, data: bytes) -> None:
        """A session of an id its old shard still holds is handed off first: the create
        is then refused (``SessionExists``) as for any live id."""
        src = self._from(sid)
        if src is not None:
            try:
                await self._hand_off(src, sid, lease=False)
            except SessionHeld:
                raise SessionExists(f"session {sid!r} already exists in the shared store (on "
                                    "its shard of the previous list); resume it or pick "
                                    "another id") from None
        await self.new.create(sid, data)

    async def acquire(self, sid: str) -> tuple[bytes, bool] | None:
        src = self._from(sid)
        try:
            got = await self.new.acquire(sid)
        except SessionRelocated:
            if src is None:
                raise
            got = None  # a tombstone of an earlier resharding from this shard
        if got is not None or src is None:
            return got
        moved = await self._hand_off(src, sid, lease=True)
        if moved is not None:
            return moved.data, moved.writer not in ("", self.owner)
        try:  # gone, or another mover came first
            return await self.new.acquire(sid)
        except SessionRelocated:
            return None  # nothing here but that earlier tombstone

    async def peek(self, sid: str) -> bytes | None:
        got = await self.new.peek(sid)
        src = self._from(sid)
        if got is not None or src is None:
            return got
        # on the old shard, or handed off between the two reads: then on the new one
        return await src.peek(sid) or await self.new.peek(sid)

    async def final(self, sid: str) -> bytes | None:
        got = await self.new.final(sid)
        src = self._from(sid)
        return got if got is not None or src is None else await src.final(sid)

    async def delete(self, sid: str) -> None:
        await self.new.delete(sid)

    async def release(self, sids: Iterable[str]) -> None:
        await self.new.release(sids)

    async def checkpoint_many(self, steps: list[tuple[str, bytes, int, int, bool, bool]]
                              ) -> list[BaseException | None]:
        return await self.new.checkpoint_many(steps)


SharedStore = RedisStore | ShardedStore | MovingStore


def open_store(urls: list[str], previous: list[str] | None = None, **kw: Any
               ) -> SharedStore:
    """The shared store at ``urls`` (``Settings.store_urls``): one Redis, or several (a
    ``ShardedStore``); with ``previous`` (``Settings.store_from_urls``), a
    ``MovingStore`` from that list to this one. ``on_op`` is a function of the shard's
    index (0 for one; "fromJ" for shard J of the previous list)."""
    if previous:
        return MovingStore(urls, previous, **kw)
    return _open(urls, **kw)


def _open(urls: list[str], **kw: Any) -> RedisStore | ShardedStore:
    on_op = kw.pop("on_op", None)
    marks = kw.pop("marks", None)
    if len(urls) == 1:
        return RedisStore(urls[0], on_op=None if on_op is None else on_op(0),
                          marks=None if marks is None else marks[0], **kw)
    return ShardedStore(urls, on_op=on_op, marks=marks, **kw)

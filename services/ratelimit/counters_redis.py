"""The counters in Redis or a Redis Cluster, shared by every replica of the rate-limit service.

**One script call per batch.** `EVALUATE` (a kit `Script`: called by SHA, loaded again after NOSCRIPT) runs the
`Evaluation`s it is given one after another, each atomically and as if alone (a later one sees what an earlier one
counted): for each it computes what `window.evaluate` computes (model.py states the semantics), on the packed value
below, and the contract tests run it and the in-process backend against the same cases (a random run too, with
clocks stepping back). A batch is one call per `SCRIPT_BATCH` evaluations (on a cluster, per hash slot: the subject
is the keys' hash tag), all in one `RoundTrip` (one round trip; on a cluster redis-py's pipeline sends each node its
share at once). One call for many evaluations instead of one each took the service's CPU per evaluation from about
44 to 33 µs (a batch of 10, in process); Redis's own CPU is the script's work, the same either way.

**A counter** is one string per (subject, limit) at `counter_key(subject, limit)`: its buckets oldest first, each
a pair of little-endian doubles (bucket index, units > 0), then the total of their units (a double): 16 bytes per
bucket + 8. The script reads it with one GET and unpacks only what it needs with Redis's bundled `struct` library
(C): the total, the newest pair, the oldest pair (the buckets it prunes, as `Window.prune` does: those older than
j - n, always the first ones). So a counter holds at most n + 1 buckets (n = the limit's buckets) whatever its
count (one more per bucket written while a clock had stepped back, until time passes it), and the usual
evaluation, a window whose newest bucket is j or older, sums nothing: the units counted are the total. It writes at
most once per counter, only what changed: units added to the newest bucket with nothing pruned → `SETRANGE` of
its 16 last bytes; a newer bucket appended with nothing pruned → `SETRANGE` (extending it) and `PEXPIRE`; buckets
pruned or one written behind the newest (a clock that stepped back) → `SET` of the whole value; every bucket
pruned and nothing added → `DEL`. A peek or a refusal that prunes nothing writes nothing. Thus a key exists only
while it holds units (and `reset` counts the counters that held units, as the in-process backend does). **Expiry:**
whenever a newer bucket becomes the newest (or the counter is new) the key's TTL is set to (n + 1) * bucket, the
longest any unit of that bucket can count; units added to a bucket that already existed keep the TTL (they stop
counting with their bucket, which it already covers) — setting a TTL costs Redis about as much as the write.

**Numbers.** Lua numbers are doubles: every value (µs since the epoch, bucket indices, counts) is an integer below
2^53 and stays exact, in the packed doubles too; the bucket index is computed with a float division then corrected
to the exact floor. The arguments are packed the same way (`script_call`): per charge five doubles (bucket µs,
buckets, count, units, flags: 1 shadow + 2 consume_refused), one string for all charges, as decimal arguments cost
the script a string conversion each. Replies are integers, -1 for "none".

**Time.** `now_us` None: the script reads Redis `TIME`, so every service replica counts on one clock.

**Failure.** An evaluation that could not run (a key holding something else: WRONGTYPE, or a value that is not a
counter) is a `StoreUnavailable` in its place, found before anything of it is written, and the others of its call
run all the same; a call failing as a whole (a script error such as OOM, a node's reply lost) makes each of its
evaluations a `StoreUnavailable` (those before the failure may have been counted: refused or allowed by their
limits' fail mode, never counted twice); the batch failing as a whole (connection refused or timed out; on a
cluster a node down fails redis-py's whole pipeline) raises `StoreUnavailable`. An evaluation never runs twice:
the kit's cluster client (`ClusterClient`, tradeguard/storage/redis.py) never sends a command again after a
failure, and reloads its slot map in the background instead, so that the calls after a failover reach the
promoted replica; a cluster client made otherwise is refused. The client reconnects on its own on the next call.
Messages never carry the password (masked as `***`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from services.ratelimit.counters import counter_key
from services.ratelimit.model import Count, Counted, Evaluation, Limit, StoreUnavailable
from tradeguard.storage.redis import Client, ClusterClient, RedisConfig, RoundTrip, Script, connect, healthy

__all__ = ["EVALUATE", "SCRIPT_BATCH", "RedisCounters", "script_call"]

# Evaluations one after another, each as if alone (a later one sees what an earlier one counted).
# KEYS: every evaluation's counters in turn (one slot for the whole call). ARGV: now µs (0: Redis TIME), then per
# evaluation three: its number of keys, consume (1/0), its charges packed by `script_call` (one key per charge, or
# one key and no charge: an evaluation for the store's clock alone). Reply: per evaluation either an error (that
# evaluation alone could not run: a key holding something else; nothing of it was written) or allowed (1/0), now µs,
# then per charge: counted, fits (1/0), reset µs or -1, retry µs or -1.
EVALUATE: Final = Script(
    """
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local floor, pack, read, sub = math.floor, struct.pack, struct.unpack, string.sub

-- One evaluation: its keys KEYS[base + 1 ..], atomically with the rest of the call.
local function evaluate(base, nkeys, consume, spec)
if #spec % 40 ~= 0 or #spec / 40 > nkeys then return redis.error_reply('ERR ratelimit: malformed charges') end
local m = #spec / 40
local KEYS = {unpack(KEYS, base + 1, base + m)}

-- One counter as this call sees it (shared by the charges on its key): the value `v` as read, `size` buckets
-- of which the first `cut` are pruned; `total` units in the others, `oldest` and `newest` of them (-1: none),
-- `last` the newest one's units; `add` units this call adds to bucket `j`.
local counters, before = {}, {}

-- window.counted(j, n): the units of the buckets up to j (none older than j - n is left)
local function counted(w)
  local total, j = w.total + w.add, w.j
  if w.newest <= j then return total end
  local v, p, first = w.v, 16 * w.size - 15, 16 * w.cut + 1
  while p >= first do -- buckets after j (written by a clock ahead of this one's) are not counted
    local k, u = read('<dd', v, p)
    if k <= j then break end
    total, p = total - u, p - 16
  end
  return total
end

local allowed = true
for c = 1, m do
  local key = KEYS[c]
  local g, n, count, units, flags = read('<ddddd', spec, 40 * c - 39)
  local w = counters[key]
  if not w then
    local j = floor(now / g)
    if j * g > now then j = j - 1 elseif (j + 1) * g <= now then j = j + 1 end
    local v = redis.pcall('GET', key)
    if type(v) == 'table' and v.err then return v end -- WRONGTYPE: before anything of it is written
    v = v or ''
    local size, cut, total, oldest, newest, last = 0, 0, 0, -1, -1, 0
    if v ~= '' then
      size = (#v - 8) / 16
      if size < 1 or size % 1 ~= 0 then
        return redis.error_reply('ERR ratelimit: ' .. key .. ' holds no counter')
      end
      newest, last, total = read('<ddd', v, #v - 23)
      -- window.prune(j, n): the buckets older than j - n, the first ones, are cut
      while cut < size do
        local k, u = read('<dd', v, 16 * cut + 1)
        if k >= j - n then
          oldest = k
          break
        end
        total, cut = total - u, cut + 1
      end
      if cut == size then newest = -1 end
    end
    w = {
      v = v, size = size, cut = cut, total = total, oldest = oldest, newest = newest, last = last, add = 0,
      j = j, n = n, g = g, written = false,
    }
    counters[key] = w
  end
  local b = counted(w)
  before[c] = b
  if b + units > count and flags % 2 == 0 then allowed = false end
end

local reply = {allowed and 1 or 0, now}
for c = 1, m do
  local w = counters[KEYS[c]]
  local _, _, count, units, flags = read('<ddddd', spec, 40 * c - 39)
  local b, j, n, g = before[c], w.j, w.n, w.g
  local fits = b + units <= count
  local added = consume and (allowed or flags >= 2)
  if added then w.add = w.add + units end
  -- window.reset_us: the oldest bucket if it is counted, else bucket j if it holds what this call added
  local reset = -1
  if w.oldest >= 0 and w.oldest <= j then
    reset = (w.oldest + n + 1) * g
  elseif w.add > 0 then
    reset = (j + n + 1) * g
  end
  -- window.retry_us: when the same units would first fit
  local retry = -1
  if fits and not added then
    retry = now
  elseif units <= count then
    local need = counted(w) + units - count
    if need <= 0 then
      retry = now
    else
      local v, p, last, freed = w.v, 16 * w.cut + 1, 16 * w.size - 15, 0
      while p <= last do
        local k, u = read('<dd', v, p)
        if k >= j then break end
        freed = freed + u
        if freed >= need then
          retry = (k + n + 1) * g
          break
        end
        p = p + 16
      end
      -- else only bucket j leaving makes room (every counted unit leaving always does)
      if retry < 0 then retry = (j + n + 1) * g end
    end
  end
  reply[#reply + 1] = b + ((added and units) or 0)
  reply[#reply + 1] = fits and 1 or 0
  reply[#reply + 1] = reset
  reply[#reply + 1] = retry
end

-- Each counter that changed written once: in place when nothing was cut, else whole (see the module).
for c = 1, m do
  local key = KEYS[c]
  local w = counters[key]
  if not w.written then
    w.written = true
    local v, size, cut, add, j, newest = w.v, w.size, w.cut, w.add, w.j, w.newest
    local total, first = w.total + add, 16 * cut + 1
    if add > 0 then
      if newest == j then -- the newest bucket gains units
        if cut == 0 then
          redis.call('SETRANGE', key, #v - 16, pack('<dd', w.last + add, total))
        else
          redis.call('SET', key, sub(v, first, #v - 24) .. pack('<ddd', j, w.last + add, total), 'KEEPTTL')
        end
      elseif newest < j then -- a newer bucket (or the first): the key lives (n + 1) buckets from now
        local ttl = floor(((w.n + 1) * w.g + 999) / 1000)
        if cut == 0 and size > 0 then
          redis.call('SETRANGE', key, #v - 8, pack('<ddd', j, add, total))
          redis.call('PEXPIRE', key, ttl)
        else
          redis.call('SET', key, sub(v, first, #v - 8) .. pack('<ddd', j, add, total), 'PX', ttl)
        end
      else -- this clock is behind the newest bucket's: bucket j in its place
        local p, k, u = 16 * size - 15, -1, 0
        while p >= first do
          k, u = read('<dd', v, p)
          if k <= j then break end
          p = p - 16
        end
        local value
        if p >= first and k == j then
          value = sub(v, first, p - 1) .. pack('<dd', j, u + add) .. sub(v, p + 16, #v - 8)
        else
          value = sub(v, first, p + 15) .. pack('<dd', j, add) .. sub(v, p + 16, #v - 8)
        end
        redis.call('SET', key, value .. pack('<d', total), 'KEEPTTL')
      end
    elseif cut > 0 and cut == size then
      redis.call('DEL', key)
    elseif cut > 0 then
      redis.call('SET', key, sub(v, first, #v - 8) .. pack('<d', total), 'KEEPTTL')
    end
  end
end
return reply
end

local replies, base = {}, 0
for i = 2, #ARGV, 3 do
  local nkeys = tonumber(ARGV[i])
  replies[#replies + 1] = evaluate(base, nkeys, ARGV[i + 1] == '1', ARGV[i + 2])
  base = base + nkeys
end
return replies
""",
    name="ratelimit-evaluate",
)

_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


SCRIPT_BATCH: Final = 64  # evaluations per script call at most (Redis runs one call at a time)
_CHARGE: Final = struct.Struct("<5d")  # bucket µs, buckets, count, units, flags (1 shadow, 2 consume_refused)


def _packed(evaluation: Evaluation) -> bytes:
    """An evaluation's charges as the script reads them (five doubles each)."""
    return b"".join(
        _CHARGE.pack(
            charge.limit.bucket_us,
            charge.limit.buckets,
            charge.limit.count,
            charge.units,
            int(charge.limit.shadow) + 2 * int(charge.limit.consume_refused),
        )
        for charge in evaluation.charges
    )


def script_call(evaluations: Sequence[Evaluation], now_us: int) -> tuple[list[str], list[int | bytes]]:
    """`EVALUATE`'s keys and arguments for `evaluations`, run one after another in one call (their keys must all be
    in one slot on a cluster). `now_us` 0: the store's clock."""
    keys: list[str] = []
    args: list[int | bytes] = [now_us]
    for evaluation in evaluations:
        own = [counter_key(evaluation.subject, charge.limit) for charge in evaluation.charges]
        # An evaluation with no charge still runs (for the store's clock) on its subject's slot.
        own = own or [counter_key(evaluation.subject, _NO_LIMIT)]
        keys += own
        args += (len(own), int(evaluation.consume), _packed(evaluation))
    return keys, args


def _decode(evaluation: Evaluation, reply: Any) -> Counted:
    """The script's integers as a `Counted`; a reply of another shape is an error (ValueError, TypeError)."""
    values = [int(v) for v in reply] if isinstance(reply, list) else []
    if len(values) != 2 + 4 * len(evaluation.charges):
        raise ValueError(f"the script answered {reply!r}")
    allowed, now = values[0] == 1, values[1]
    counts = tuple(
        Count(
            counted=values[i],
            fits=values[i + 1] == 1,
            reset_us=None if values[i + 2] < 0 else values[i + 2],
            retry_us=None if values[i + 3] < 0 else values[i + 3],
        )
        for i in range(2, len(values), 4)
    )
    return Counted(allowed=allowed, consumed=evaluation.consume and allowed, counts=counts, now_us=now)


def _password(redis_client: Client) -> str | None:
    """The client's password (to mask it in messages), wherever redis-py keeps it."""
    holder = getattr(redis_client, "connection_pool", None) or getattr(redis_client, "nodes_manager", None)
    kwargs = getattr(holder, "connection_kwargs", None)
    password = kwargs.get("password") if isinstance(kwargs, dict) else None
    return password if isinstance(password, str) and password else None


class RedisCounters:
    """`Counters` in Redis (see the module). `open` connects to a `RedisConfig` (standalone or cluster)."""

    def __init__(self, client: Client, *, owns_client: bool = True) -> None:
        if isinstance(client, RedisCluster) and not isinstance(client, ClusterClient):
            # redis-py's own cluster client sends a pipeline again after a failure: evaluations counted twice
            raise TypeError(
                "a cluster client must be the kit's ClusterClient (tradeguard.storage.redis.connect)"
            )
        self.client = client
        self._owns_client = owns_client
        self._password = _password(client)
        self._closed = False

    @classmethod
    async def open(cls, config: RedisConfig) -> RedisCounters:
        """Connect (PING answered, a cluster `cluster_state:ok`): raises the kit's `RedisUnavailable` (masked
        URL) otherwise. Closing the counters closes the client."""
        return cls(await connect(config))

    def _unavailable(self, error: BaseException) -> StoreUnavailable:
        """The error as a `StoreUnavailable` (password masked)."""
        text = f"Redis: {type(error).__name__}: {error}"
        if self._password:
            text = text.replace(self._password, "***")
        return StoreUnavailable(text)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the counters are closed")

    async def evaluate(
        self, batch: Sequence[Evaluation], now_us: int | None = None
    ) -> list[Counted | StoreUnavailable]:
        self._check_open()
        if not batch:
            return []
        if now_us is not None and now_us <= 0:
            raise ValueError(f"now_us must be positive, not {now_us}")
        groups = self._groups(batch)
        trip = RoundTrip(self.client)
        for group in groups:
            trip.script(EVALUATE, *script_call([batch[i] for i in group], now_us or 0))
        try:
            replies = await trip.execute(raise_on_error=False)
        except _FAILURES as error:
            raise self._unavailable(error) from None
        # every place is filled below; the default is the fail-closed answer all the same
        results: list[Counted | StoreUnavailable] = [StoreUnavailable("not evaluated")] * len(batch)
        for group, reply in zip(groups, replies, strict=True):
            if isinstance(reply, BaseException) or not isinstance(reply, list) or len(reply) != len(group):
                # the call as a whole failed (or answered another shape): none of its evaluations is known
                failed = self._unavailable(
                    reply
                    if isinstance(reply, BaseException)
                    else ValueError(f"the script answered {reply!r}")
                )
                for i in group:
                    results[i] = failed
                continue
            for i, answer in zip(group, reply, strict=True):
                if isinstance(answer, BaseException):
                    results[i] = self._unavailable(answer)
                    continue
                try:
                    results[i] = _decode(batch[i], answer)
                except (ValueError, TypeError) as error:
                    results[i] = self._unavailable(error)
        return results

    def _groups(self, batch: Sequence[Evaluation]) -> list[list[int]]:
        """The batch's evaluations by script call: in order, at most `SCRIPT_BATCH` per call; on a cluster, one
        call per slot (the subject is the keys' hash tag)."""
        by_slot: dict[int, list[int]] = {}
        if isinstance(self.client, RedisCluster):
            for i, evaluation in enumerate(batch):
                slot = key_slot(counter_key(evaluation.subject, _NO_LIMIT).encode())
                by_slot.setdefault(slot, []).append(i)
        else:  # one server: any keys in one call
            by_slot[0] = list(range(len(batch)))
        return [
            indices[i : i + SCRIPT_BATCH]
            for indices in by_slot.values()
            for i in range(0, len(indices), SCRIPT_BATCH)
        ]

    async def reset(self, subject: str, limits: Sequence[Limit]) -> int:
        """DEL the subject's counters of `limits` (one slot: one command); how many held units."""
        self._check_open()
        keys = list(dict.fromkeys(counter_key(subject, limit) for limit in limits))
        if not keys:
            return 0
        try:
            return int(await self.client.delete(*keys))
        except _FAILURES as error:
            raise self._unavailable(error) from None

    async def healthy(self) -> bool:
        return not self._closed and await healthy(self.client)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self.client.aclose()


# The routing key of an evaluation without charges (never written: the script touches only charged keys).
_NO_LIMIT: Final = Limit(name="none", group="none", count=1, window_us=1, buckets=1)

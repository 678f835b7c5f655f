"""The counters in Redis or a Redis Cluster, shared by every replica of the rate-limit service.

**One script per request.** `EVALUATE` (a kit `Script`: called by SHA, loaded again after NOSCRIPT) runs one
`Evaluation` atomically: it computes what `window.evaluate` computes (model.py states the semantics), on the packed
value below, and the contract tests run it and the in-process backend against the same cases (a random run too,
with clocks stepping back). All evaluations of a batch go in one `RoundTrip` (one round trip; on a cluster
redis-py's pipeline sends each node its share at once).

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
to the exact floor. The arguments are packed the same way (`script_arguments`): per charge five doubles (bucket µs,
buckets, count, units, flags: 1 shadow + 2 consume_refused), one string for all charges, as decimal arguments cost
the script a string conversion each. Replies are integers, -1 for "none".

**Time.** `now_us` None: the script reads Redis `TIME`, so every service replica counts on one clock.

**Failure.** An evaluation whose call failed (a script error such as OOM, WRONGTYPE or a value that is not a
counter, a node's reply lost) is a `StoreUnavailable` in its place; the batch failing as a whole (connection
refused or timed out; on a cluster a node down fails redis-py's whole pipeline) raises `StoreUnavailable`. Either
way the evaluation ran entirely or not at all (a lost reply may hide a run), and never twice: the kit's cluster
client (`ClusterClient`, tradeguard/storage/redis.py) never sends a command again after a failure, and reloads its
slot map in the background instead, so that the calls after a failover reach the promoted replica; a cluster
client made otherwise is refused. The client reconnects on its own on the next call. Messages never carry the
password (masked as `***`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from services.ratelimit.counters import counter_key
from services.ratelimit.model import Count, Counted, Evaluation, Limit, StoreUnavailable
from tradeguard.storage.redis import Client, ClusterClient, RedisConfig, RoundTrip, Script, connect, healthy

__all__ = ["EVALUATE", "RedisCounters", "script_arguments"]

# KEYS: the counter of each charge (one slot). ARGV: now µs (0: Redis TIME), consume (1/0), the charges packed by
# `script_arguments`. Reply: allowed (1/0), now µs, then per charge: counted, fits (1/0), reset µs or -1, retry µs
# or -1.
EVALUATE: Final = Script(
    """
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local consume, spec = ARGV[2] == '1', ARGV[3]
if #spec % 40 ~= 0 then return redis.error_reply('ERR ratelimit: malformed charges') end
local m = #spec / 40
local floor, pack, read, sub = math.floor, struct.pack, struct.unpack, string.sub

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
    local v = redis.call('GET', key) or ''
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
""",
    name="ratelimit-evaluate",
)

_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


_CHARGE: Final = struct.Struct("<5d")  # bucket µs, buckets, count, units, flags (1 shadow, 2 consume_refused)


def script_arguments(evaluation: Evaluation, now_us: int) -> list[int | bytes]:
    """`EVALUATE`'s arguments for `evaluation` (its keys: `counter_key` of each charge's limit, in order)."""
    charges = b"".join(
        _CHARGE.pack(
            charge.limit.bucket_us,
            charge.limit.buckets,
            charge.limit.count,
            charge.units,
            int(charge.limit.shadow) + 2 * int(charge.limit.consume_refused),
        )
        for charge in evaluation.charges
    )
    return [now_us, int(evaluation.consume), charges]


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
        trip = RoundTrip(self.client)
        for evaluation in batch:
            keys = [counter_key(evaluation.subject, charge.limit) for charge in evaluation.charges]
            # An evaluation with no charge still runs (for the store's clock) on its subject's slot.
            keys = keys or [counter_key(evaluation.subject, _NO_LIMIT)]
            trip.script(EVALUATE, keys, script_arguments(evaluation, now_us or 0))
        try:
            replies = await trip.execute(raise_on_error=False)
        except _FAILURES as error:
            raise self._unavailable(error) from None
        results: list[Counted | StoreUnavailable] = []
        for evaluation, reply in zip(batch, replies, strict=True):
            if isinstance(reply, BaseException):
                results.append(self._unavailable(reply))
                continue
            try:
                results.append(_decode(evaluation, reply))
            except (ValueError, TypeError) as error:
                results.append(self._unavailable(error))
        return results

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

"""The counters in Redis or a Redis Cluster, shared by every replica of the rate-limit service.

**One script per request.** `EVALUATE` (a kit `Script`: called by SHA, loaded again after NOSCRIPT) runs one
`Evaluation` atomically: it is a line-for-line translation of `window.evaluate` (model.py states the semantics),
and the contract tests run it and the in-process backend against the same cases. All evaluations of a batch go in
one `RoundTrip` (one round trip; on a cluster redis-py's pipeline sends each node its share at once).

**A counter** is a hash per (subject, limit) at `counter_key(subject, limit)`: bucket index (decimal) → units,
nothing else. The script reads it whole (HGETALL) and deletes the buckets older than j - n (HDEL), as
`Window.prune` does; so a counter holds at most n + 1 fields (n = the limit's buckets) whatever its count (one
more per bucket written while a clock had stepped back, until time passes it), and reading it is O(n). A hash whose last bucket is pruned disappears (so `reset` counts the counters that held
units, as the in-process backend does). Adding units sets the key's TTL (PEXPIRE) to (n+1) * bucket, the longest
any unit can count. Every key of one subject carries the subject as its hash tag (`tg:rl:{<subject>}:…`), so one
request is one script call on one node.

**Numbers.** Lua numbers are doubles: every value (µs since the epoch, bucket indices, counts) is an integer below
2^53 and stays exact; bucket fields are written with `%.0f` (never Lua's 14-digit `tostring`), and the bucket
index is computed with a float division then corrected to the exact floor. Replies are integers, -1 for "none".

**Time.** `now_us` None: the script reads Redis `TIME`, so every service replica counts on one clock.

**Failure.** An evaluation whose call failed (a script error such as OOM or WRONGTYPE, a node's reply lost) is a
`StoreUnavailable` in its place; the batch failing as a whole (connection refused or timed out; on a cluster a
node down fails redis-py's whole pipeline) raises `StoreUnavailable`. Either way the evaluation ran entirely or
not at all (a lost reply may hide a run), and never twice: on a cluster, redis-py's own retries are turned off
(after a connection error it re-sends a whole pipeline, commands that had already run included), and a failure
that may mean a node is gone reloads the slot map in the background instead, so that the calls after a failover
reach the promoted replica (redirections, MOVED and ASK, are still followed: those commands had not run). The
client reconnects on its own on the next call. Messages never carry the password (masked as `***`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ClusterError, RedisClusterException, RedisError, ResponseError

from services.ratelimit.counters import counter_key
from services.ratelimit.model import Count, Counted, Evaluation, Limit, StoreUnavailable
from tradeguard.storage.redis import Client, RedisConfig, RoundTrip, Script, connect, healthy

__all__ = ["EVALUATE", "RedisCounters"]

# KEYS: the counter of each charge (one slot). ARGV: now µs (0: Redis TIME), consume (1/0), then per charge:
# bucket µs, buckets, count, units, shadow (1/0), consume_refused (1/0).
# Reply: allowed (1/0), now µs, then per charge: counted, fits (1/0), reset µs or -1, retry µs or -1.
EVALUATE: Final = Script(
    """
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local consume = ARGV[2] == '1'
local m = (#ARGV - 2) / 6
local function field(k) return string.format('%.0f', k) end

-- The charges, and each key's buckets (read once, shared by charges on one key).
local charges, windows = {}, {}
for c = 1, m do
  local a = 2 + (c - 1) * 6
  local ch = {
    key = KEYS[c], g = tonumber(ARGV[a + 1]), n = tonumber(ARGV[a + 2]), count = tonumber(ARGV[a + 3]),
    units = tonumber(ARGV[a + 4]), shadow = ARGV[a + 5] == '1', refused = ARGV[a + 6] == '1',
  }
  local j = math.floor(now / ch.g)
  if j * ch.g > now then j = j - 1 elseif (j + 1) * ch.g <= now then j = j + 1 end
  ch.j, ch.low = j, j - ch.n
  local w = windows[ch.key]
  if not w then
    -- window.prune(j, n): drop the buckets older than j - n (the hash holds only buckets: at most n + 1)
    local flat = redis.call('HGETALL', ch.key)
    local counts, stale = {}, {}
    for x = 1, #flat, 2 do
      local k = tonumber(flat[x])
      if k < ch.low then stale[#stale + 1] = flat[x] else counts[k] = tonumber(flat[x + 1]) end
    end
    if #stale > 0 then redis.call('HDEL', ch.key, unpack(stale)) end
    w = {counts = counts}
    windows[ch.key] = w
  end
  ch.w = w
  charges[c] = ch
end

local function counted(ch)
  local total = 0
  for k = ch.low, ch.j do total = total + (ch.w.counts[k] or 0) end
  return total
end

local allowed = true
for c = 1, m do
  local ch = charges[c]
  ch.before = counted(ch)
  ch.fits = ch.before + ch.units <= ch.count
  if not ch.fits and not ch.shadow then allowed = false end
end

local reply = {allowed and 1 or 0, now}
for c = 1, m do
  local ch = charges[c]
  local w, n, g, j = ch.w, ch.n, ch.g, ch.j
  local added = consume and (allowed or ch.refused)
  if added and ch.units > 0 then
    redis.call('HINCRBY', ch.key, field(j), ch.units)
    w.counts[j] = (w.counts[j] or 0) + ch.units
    redis.call('PEXPIRE', ch.key, math.floor(((n + 1) * g + 999) / 1000))
  end
  -- window.reset_us: when the oldest counted units leave the window
  local reset = -1
  for k = ch.low, j do
    if (w.counts[k] or 0) > 0 then
      reset = (k + n + 1) * g
      break
    end
  end
  -- window.retry_us: when the same units would first fit
  local retry = -1
  if ch.fits and not added then
    retry = now
  elseif ch.units <= ch.count then
    local need = counted(ch) + ch.units - ch.count
    if need <= 0 then
      retry = now
    else
      local freed = 0
      for k = ch.low, j do
        freed = freed + (w.counts[k] or 0)
        if freed >= need then
          retry = (k + n + 1) * g
          break
        end
      end
    end
  end
  reply[#reply + 1] = ch.before + ((added and ch.units) or 0)
  reply[#reply + 1] = ch.fits and 1 or 0
  reply[#reply + 1] = reset
  reply[#reply + 1] = retry
end
return reply
""",
    name="ratelimit-evaluate",
)

_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


def _topology_suspect(error: BaseException) -> bool:
    """A failure after which a cluster's map of slots to nodes may be stale (a node down, a failover)."""
    return isinstance(error, ClusterError | RedisClusterException) or (
        isinstance(error, RedisError | OSError | TimeoutError) and not isinstance(error, ResponseError)
    )


def _arguments(evaluation: Evaluation, now_us: int) -> list[int]:
    args = [now_us, int(evaluation.consume)]
    for charge in evaluation.charges:
        limit = charge.limit
        args += [limit.bucket_us, limit.buckets, limit.count, charge.units]
        args += [int(limit.shadow), int(limit.consume_refused)]
    return args


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
        self.client = client
        self._owns_client = owns_client
        self._password = _password(client)
        self._closed = False
        self._refreshing: asyncio.Task[None] | None = None
        self.topology_refreshes = 0  # cluster only: slot maps reloaded after a failure
        if isinstance(client, RedisCluster):
            # An evaluation is never sent twice: after a connection error redis-py re-sends a whole cluster
            # pipeline, commands that had run included (counted twice). No retries; the map is reloaded instead.
            client.set_retry(Retry(NoBackoff(), 0))

    @classmethod
    async def open(cls, config: RedisConfig) -> RedisCounters:
        """Connect (PING answered, a cluster `cluster_state:ok`): raises the kit's `RedisUnavailable` (masked
        URL) otherwise. Closing the counters closes the client."""
        return cls(await connect(config))

    def _unavailable(self, error: BaseException) -> StoreUnavailable:
        """The error as a `StoreUnavailable` (password masked); on a cluster, a failure that may mean a node
        is gone starts reloading the slot map in the background (one reload at a time), so that the calls after
        a failover reach the promoted replica."""
        if (
            isinstance(self.client, RedisCluster)
            and _topology_suspect(error)
            and not self._closed
            and (self._refreshing is None or self._refreshing.done())
        ):
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh(self.client))
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
            trip.script(EVALUATE, keys, _arguments(evaluation, now_us or 0))
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

    async def _refresh(self, cluster: RedisCluster) -> None:
        self.topology_refreshes += 1
        with contextlib.suppress(Exception):  # unreachable now: the next failure tries again
            await cluster.nodes_manager.initialize()

    async def healthy(self) -> bool:
        return not self._closed and await healthy(self.client)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing
        if self._owns_client:
            await self.client.aclose()


# The routing key of an evaluation without charges (never written: the script touches only charged keys).
_NO_LIMIT: Final = Limit(name="none", group="none", count=1, window_us=1, buckets=1)

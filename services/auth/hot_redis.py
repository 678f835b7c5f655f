"""The auth service's hot state in Redis (or a Redis Cluster), shared by every auth replica.

Each method is one command or one Lua script (`tradeguard.storage.redis.Script`: EVALSHA), so each is atomic
across replicas:

- `claim_nonce`: `SET key 1 NX PX ttl` — exactly one claimer of a (key id, nonce) gets OK until the TTL ends.
- `advance_totp_step`: a script compares the stored step with the offered one and sets it (with its TTL) only if
  the offered one is greater: a code is accepted once, and never an older one after a newer.
- `count_failure`: a **sliding log** (a sorted set of failure times): the script drops the times at or before
  `now - window`, adds this one and returns the count. Exact, up to `max_failures_per_subject` times kept per
  subject (the count saturates there; the oldest are dropped first). The key's TTL is the longest window used.
- `lock`: a script that sets the lock's end only if it is later than the stored one (a later lock extends it,
  an earlier one never shortens it); the key expires when the lock ends.
- `take_challenge`: `GETDEL` (taken once); `put_challenge`: `SET PX`.
- revocations: `publish_revocation` is one script: the next sequence (`INCR`; the counter starts at the
  publisher's clock in microseconds when absent, so a flushed or expired counter never goes back below a
  sequence a guard has seen, as long as fewer than one revocation per microsecond was published), the revocation in a sorted set scored by sequence (`live`) and in one scored by its
  expiry (`expiry`; expired revocations are removed as later ones are published), and an entry with the ID
  `<sequence>-0` on a capped stream (`wake`, MAXLEN ~256) that exists only to wake waiters.
  `revocations_after` reads `live` after the sequence (one ZRANGEBYSCORE); when there is nothing it waits
  without polling: one task per `RedisHotState` blocks on `XREAD BLOCK` on `wake` from the newest ID it has seen
  (in chunks shorter than the socket timeout) and wakes every local waiter when an entry arrives; so however many
  guards stream from this replica, one connection waits. The XREAD starts from an ID, not `$`, so a
  publication between a waiter's read and its wait is never missed.

Every key has a TTL: nonces, TOTP steps, challenges and failure logs their own; a lock until it ends; the
revocation keys until the last revocation in them expires. So a flood of distinct keys, nonces or subjects ages
out without anyone cleaning up.

**Time.** Windows, locks and revocation expiry are computed with the injected clock (the wall clock in
production: replicas agree to within their clock skew, which shifts a window by as much); TTLs are Redis's own
(`PX`), derived from the same values, and only make keys disappear.

**Keys** start with a configurable prefix (default "tg:auth:"). Each subject's keys carry it as a hash tag
(`tg:auth:lock:{account:42}`), so the keys of one subject share a slot, and the revocation keys share the tag
`{rev}`: every script touches one slot, and the store works on a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import secrets
from collections.abc import Callable
from typing import Any

from services.auth.model import Revocation, RevocationKind
from tradeguard.storage import clock_us
from tradeguard.storage.redis import Client, RedisConfig, Script, connect

__all__ = ["DEFAULT_MAX_FAILURES_PER_SUBJECT", "DEFAULT_PREFIX", "RedisHotState"]

DEFAULT_PREFIX = "tg:auth:"
DEFAULT_MAX_FAILURES_PER_SUBJECT = 1000
WAKE_STREAM_LENGTH = 256
_EXPIRED_BATCH = 500  # expired revocations removed per publication at most (each publication adds one)

# KEYS[1] the step; ARGV: step, ttl ms
_ADVANCE_TOTP = Script(
    """
local last = redis.call('GET', KEYS[1])
if last and tonumber(last) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""",
    name="auth-advance-totp-step",
)

# KEYS[1] the failure log; ARGV: now us, now - window us, unique member, cap, ttl ms
_COUNT_FAILURE = Script(
    """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
local n = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[4])
if n > cap then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - cap - 1)
  n = cap
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[5]) then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
return n
""",
    name="auth-count-failure",
)

# KEYS[1] the lock; ARGV: until us, ttl ms
_LOCK = Script(
    """
local current = redis.call('GET', KEYS[1])
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""",
    name="auth-lock",
)

# KEYS: sequence, live, expiry, wake; ARGV: first sequence if absent, payload, expire us, now us, ttl ms,
# wake length, expired batch. Returns the sequence as a string (exact: no Lua number formatting).
_PUBLISH = Script(
    """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
redis.call('INCR', KEYS[1])
local seq = redis.call('GET', KEYS[1])
local member = seq .. '\\n' .. ARGV[2]
redis.call('ZADD', KEYS[2], seq, member)
redis.call('ZADD', KEYS[3], ARGV[3], member)
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[4], 'LIMIT', 0, tonumber(ARGV[7]))
if #expired > 0 then
  redis.call('ZREM', KEYS[2], unpack(expired))
  redis.call('ZREM', KEYS[3], unpack(expired))
end
local newest = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
if #newest > 0 and tonumber(string.match(newest[1][1], '^(%d+)')) >= tonumber(seq) then
  redis.call('DEL', KEYS[4])
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], seq .. '-0', 's', '')
for i = 1, 4 do
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[5]) then redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
end
return seq
""",
    name="auth-publish-revocation",
)


def _ms(us: int) -> int:
    """Microseconds as whole milliseconds, rounded up (a TTL never ends early), at least 1."""
    return max(1, -(-us // 1000))


def _positive(ttl_us: int) -> None:
    if ttl_us <= 0:
        raise ValueError(f"a time to live must be positive, not {ttl_us} µs")


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _decode(member: object) -> Revocation:
    sequence, kind, revoke, expire, value = _text(member).split("\n", 4)
    return Revocation(int(sequence), RevocationKind(kind), value, int(revoke), int(expire))


class RedisHotState:
    """`HotState` in Redis (see the module: the commands and scripts, the keys, the clock)."""

    def __init__(
        self,
        client: Client,
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], int] = clock_us,
        block_s: float = 1.0,
        max_failures_per_subject: int = DEFAULT_MAX_FAILURES_PER_SUBJECT,
        owns_client: bool = True,
    ) -> None:
        if block_s <= 0:
            raise ValueError("block_s must be positive")
        if max_failures_per_subject < 1:
            raise ValueError("max_failures_per_subject must be at least 1")
        self.client = client
        self.prefix = prefix
        self._clock = clock
        self._block_ms = max(1, int(block_s * 1000))
        self.max_failures_per_subject = max_failures_per_subject
        self._owns_client = owns_client
        rev = f"{prefix}{{rev}}:"
        self._rev_keys = (f"{rev}sequence", f"{rev}live", f"{rev}expiry", f"{rev}wake")
        # The shared waiter: the newest wake-stream sequence this instance has seen, and its watcher.
        self._seen = 0
        self._changed = asyncio.Event()
        self._waiters = 0
        self._watcher: asyncio.Task[None] | None = None
        self._watch_error: BaseException | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        config: RedisConfig | str,
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], int] = clock_us,
        max_failures_per_subject: int = DEFAULT_MAX_FAILURES_PER_SUBJECT,
    ) -> RedisHotState:
        """Connect to `config` (a `RedisConfig` or a redis:// URL; checked with PING); closing the hot state
        closes the client. Waits block for at most half the socket timeout per round trip."""
        if isinstance(config, str):
            config = RedisConfig.from_url(config)
        client = await connect(config)
        return cls(
            client,
            prefix=prefix,
            clock=clock,
            block_s=min(1.0, config.timeout_s / 2),
            max_failures_per_subject=max_failures_per_subject,
        )

    # --- keys --------------------------------------------------------------------------------------------------
    def nonce_key(self, key_id: str, nonce: str) -> str:
        return f"{self.prefix}nonce:{{{key_id}}}:{nonce}"

    def totp_key(self, user_id: str) -> str:
        return f"{self.prefix}totp:{{{user_id}}}"

    def failures_key(self, subject: str) -> str:
        return f"{self.prefix}failures:{{{subject}}}"

    def lock_key(self, subject: str) -> str:
        return f"{self.prefix}lock:{{{subject}}}"

    def challenge_key(self, challenge_hash: str) -> str:
        return f"{self.prefix}challenge:{{{challenge_hash}}}"

    @property
    def waiting(self) -> int:
        """Callers of `revocations_after` waiting now for a publication (all served by one blocked XREAD)."""
        return self._waiters

    @property
    def revocation_keys(self) -> tuple[str, str, str, str]:
        """(sequence counter, live by sequence, live by expiry, wake stream): one slot ({rev})."""
        return self._rev_keys

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the hot state is closed")

    # --- nonces, TOTP steps, failures, locks, challenges -------------------------------------------------------
    async def claim_nonce(self, key_id: str, nonce: str, ttl_us: int) -> bool:
        _positive(ttl_us)
        self._check_open()
        return bool(await self.client.set(self.nonce_key(key_id, nonce), b"1", nx=True, px=_ms(ttl_us)))

    async def advance_totp_step(self, user_id: str, step: int, ttl_us: int) -> bool:
        _positive(ttl_us)
        self._check_open()
        return bool(await _ADVANCE_TOTP(self.client, [self.totp_key(user_id)], [step, _ms(ttl_us)]))

    async def count_failure(self, subject: str, window_us: int) -> int:
        _positive(window_us)
        self._check_open()
        now = self._clock()
        member = f"{now}:{secrets.token_hex(6)}"  # unique: two failures in one microsecond both count
        args = [now, now - window_us, member, self.max_failures_per_subject, _ms(window_us)]
        return int(await _COUNT_FAILURE(self.client, [self.failures_key(subject)], args))

    async def clear_failures(self, subject: str) -> None:
        self._check_open()
        await self.client.delete(self.failures_key(subject))

    async def lock(self, subject: str, until_us: int) -> None:
        self._check_open()
        now = self._clock()
        if until_us > now:
            await _LOCK(self.client, [self.lock_key(subject)], [until_us, _ms(until_us - now)])

    async def locked_until(self, subject: str, now_us: int) -> int | None:
        self._check_open()
        value = await self.client.get(self.lock_key(subject))
        if value is None:
            return None
        until = int(_text(value))
        return until if until > now_us else None

    async def unlock(self, subject: str) -> None:
        self._check_open()
        await self.client.delete(self.lock_key(subject))

    async def put_challenge(self, challenge_hash: str, user_id: str, ttl_us: int) -> None:
        _positive(ttl_us)
        self._check_open()
        await self.client.set(self.challenge_key(challenge_hash), user_id.encode("utf-8"), px=_ms(ttl_us))

    async def take_challenge(self, challenge_hash: str) -> str | None:
        self._check_open()
        value = await self.client.getdel(self.challenge_key(challenge_hash))
        return None if value is None else _text(value)

    # --- revocations -------------------------------------------------------------------------------------------
    async def publish_revocation(
        self, kind: RevocationKind, value: str, revoke_time_us: int, expire_time_us: int
    ) -> Revocation:
        self._check_open()
        kind = RevocationKind(kind)
        now = self._clock()
        payload = f"{kind.value}\n{revoke_time_us}\n{expire_time_us}\n{value}"
        ttl_ms = _ms(max(expire_time_us - now, 0) + 1) + 1000  # a second past the last live instant
        args = [now - 1, payload, expire_time_us, now, ttl_ms, WAKE_STREAM_LENGTH, _EXPIRED_BATCH]
        sequence = int(_text(await _PUBLISH(self.client, list(self._rev_keys), args)))
        return Revocation(sequence, kind, value, revoke_time_us, expire_time_us)

    async def _read_after(self, sequence: int) -> builtins.list[Revocation]:
        members = await self.client.zrangebyscore(self._rev_keys[1], f"({sequence}", "+inf")
        now = self._clock()
        return [r for r in map(_decode, members) if r.expire_time_us >= now]

    async def revocations_after(self, sequence: int, wait_s: float = 0.0) -> builtins.list[Revocation]:
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            mark = self._seen  # before the read: a publication after it moves `_seen` past the mark
            found = await self._read_after(sequence)
            remaining = deadline - loop.time()
            if found or remaining <= 0:
                return found
            if not await self._wait_beyond(max(mark, sequence), remaining):
                return []

    async def _wait_beyond(self, sequence: int, timeout_s: float) -> bool:
        """Until the watcher has seen a wake entry after `sequence` (True) or `timeout_s` passed (False)."""
        self._waiters += 1
        try:
            if self._watcher is None or self._watcher.done():
                self._watch_error = None
                self._watcher = asyncio.create_task(self._watch(), name="auth-revocation-watch")
            async with asyncio.timeout(timeout_s):
                while self._seen <= sequence:
                    if self._watch_error is not None:
                        raise self._watch_error
                    self._check_open()
                    await self._changed.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters -= 1

    async def _watch(self) -> None:
        """Block on the wake stream (XREAD BLOCK, from the newest ID seen) while anyone waits; wake them."""
        wake = self._rev_keys[3]
        try:
            if self._seen == 0:
                newest: Any = await self.client.xrevrange(wake, count=1)
                if newest:
                    self._advance(newest[0][0])
            while self._waiters > 0 and not self._closed:
                reply: Any = await self.client.xread(
                    {wake: f"{self._seen}-0"}, count=64, block=self._block_ms
                )
                streams = reply.items() if isinstance(reply, dict) else (reply or ())  # RESP3 or RESP2
                for _stream, entries in streams:
                    if entries:
                        self._advance(entries[-1][0])
        except Exception as error:  # reported to the waiters, which raise it
            self._watch_error = error
            self._notify()

    def _advance(self, entry_id: Any) -> None:
        sequence = int(_text(entry_id).split("-", 1)[0])
        if sequence > self._seen:
            self._seen = sequence
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def close(self) -> None:
        """Stop the watcher (waiters then fail) and close the client if this hot state opened it."""
        if self._closed:
            return
        self._closed = True
        self._notify()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if self._owns_client:
            await self.client.aclose()

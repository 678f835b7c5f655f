"""API keys and signed requests: the misuse suite, against the real key vault (mTLS), real stores and hot state.

Most tests run on SQLite with both hot states (in process and Redis); the basic flow also runs on PostgreSQL,
and the cross-replica replay runs on Redis (two services sharing one hot state).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from services.auth.hot import HotState
from services.auth.keys import MAX_UNBOUND_LIFETIME_US, ApiKeyService, Verdict
from services.auth.keys import KeySettings as KeySettingsProtocol
from services.auth.model import ApiKey, ApiKeyKind, RevocationKind, User
from services.auth.settings import LockoutSettings, Settings
from services.auth.store import AuthStore
from services.auth.tokens import TokenSettings
from services.auth.vault_client import VaultClient
from tests.services.auth.conftest import HotBackend
from tradeguard import signing
from tradeguard.errors import InvalidArgument, NotFound, PermissionDenied
from tradeguard.testing import FakeClock

PATH = "/tradeguard.trading.v1.TradingService/PlaceOrder"
BODY = b"\x0a\x07BTC-USD\x10\x01"
CLIENT_IP = "203.0.113.5"
DAY_US = 86_400 * 1_000_000
TRADER = frozenset({"orders:read", "orders:write"})

sqlite_only = pytest.mark.parametrize("auth_db", ["sqlite"], indirect=True)


@dataclass(frozen=True)
class KeySettings:
    replay_window_ms: int = 5000
    future_skew_ms: int = 1000
    # The misuse suite sends many failures from one address to one key: thresholds out of its way (the lockout
    # tests below build services with small ones).
    lockout: LockoutSettings = dataclasses.field(
        default_factory=lambda: LockoutSettings(
            pair_threshold=50, account_threshold=100, key_threshold=100, ip_threshold=1000
        )
    )


class CountingStore:
    """An AuthStore that counts its API-key lookups (to prove a fake key id is refused without one)."""

    def __init__(self, inner: AuthStore) -> None:
        self.inner = inner
        self.lookups = 0

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        self.lookups += 1
        return await self.inner.get_api_key(key_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Env:
    store: CountingStore
    hot: HotState
    vault: VaultClient
    clock: FakeClock
    permissions: dict[str, frozenset[str]]
    service: ApiKeyService

    def another_service(self, hot: HotState, settings: KeySettings | None = None) -> ApiKeyService:
        """A second replica: its own service on the same store, with `hot` (shared state or not)."""
        return ApiKeyService(
            self.store,
            hot,
            self.vault,
            self.clock,
            os.urandom,
            settings or KeySettings(),
            self.load_owner,
        )

    async def load_owner(self, user_id: str) -> tuple[User, frozenset[str]] | None:
        user = await self.store.inner.get_user(user_id)
        return None if user is None else (user, self.permissions[user_id])

    def now_ms(self) -> int:
        return self.clock() // 1000

    def request(
        self,
        key_id: str,
        credential: str | Ed25519PrivateKey,
        *,
        timestamp_ms: int | None = None,
        nonce: str | None = None,
        path: str = PATH,
        body: bytes = BODY,
        source_ip: str = CLIENT_IP,
        permission: str = "orders:write",
    ) -> signing.SignedRequest:
        """A request signed as a client signs it; the receiver's digest of the body it received."""
        timestamp = self.now_ms() if timestamp_ms is None else timestamp_ms
        nonce = nonce or signing.new_nonce(os.urandom)
        scheme = signing.Scheme.HMAC_SHA256 if isinstance(credential, str) else signing.Scheme.ED25519
        headers = dict(signing.signed_headers(scheme, credential, key_id, timestamp, nonce, path, body))
        return signing.SignedRequest(
            key_id=headers[signing.HEADER_KEY],
            timestamp=headers[signing.HEADER_TIMESTAMP],
            nonce=headers[signing.HEADER_NONCE],
            signature=headers[signing.HEADER_SIGNATURE],
            path=path,
            body_sha256=signing.body_digest(body),
            source_ip=source_ip,
            required_permission=permission,
        )

    async def one(self, request: signing.SignedRequest, service: ApiKeyService | None = None) -> Verdict:
        (verdict,) = await (service or self.service).verify([request])
        return verdict

    async def hmac_key(self, **options: Any) -> tuple[ApiKey, str]:
        args: dict[str, Any] = {
            "user_id": "u1",
            "kind": ApiKeyKind.HMAC,
            "scopes": TRADER,
            "ip_allow_list": (),
            "tier": "standard",
            "lifetime_us": None,
            "public_key": None,
            "label": "bot",
        }
        args.update(options)
        key, secret = await self.service.create(**args)
        assert secret is not None
        return key, secret


@pytest.fixture
async def env(auth_store: AuthStore, hot_state: HotState, vault: VaultClient, clock: FakeClock) -> Env:
    permissions = {"u1": TRADER, "u2": frozenset({"orders:read"})}
    for user_id in permissions:
        user = User(user_id, f"name-{user_id}", f"acct-{user_id}", ("trader",), "$argon2id$x", clock())
        assert await auth_store.insert_user(user)
    store = CountingStore(auth_store)
    env = Env(store, hot_state, vault, clock, permissions, None)  # type: ignore[arg-type]
    env.service = env.another_service(hot_state)
    return env


def failed(verdict: Verdict, cause: str) -> None:
    assert verdict.principal is None and not verdict.permission_denied
    assert verdict.cause == cause


# --- the happy paths ---------------------------------------------------------------------------------------------


async def test_hmac_key_signs_and_verifies_on_every_backend(env: Env) -> None:
    key, secret = await env.hmac_key()
    assert signing.key_id_valid(key.key_id) and signing.hmac_secret_valid(secret)
    assert key.secret is not None and secret not in key.secret and key.secret.startswith("tgv1:credentials:")
    stored = await env.store.get_api_key(key.key_id)
    assert stored is not None and stored.secret == key.secret  # only the ciphertext is stored
    verdict = await env.one(env.request(key.key_id, secret))
    assert verdict.principal is not None and verdict.cause is None
    assert verdict.principal.user_id == "u1" and verdict.principal.account_id == "acct-u1"
    assert verdict.principal.key_id == key.key_id and verdict.principal.tier == "standard"
    assert verdict.principal.scopes == TRADER
    assert [k.key_id for k in await env.service.list("u1")] == [key.key_id]


@sqlite_only
async def test_ed25519_key_signs_and_verifies(env: Env) -> None:
    private = Ed25519PrivateKey.generate()
    key, secret = await env.service.create(
        "u1", ApiKeyKind.ED25519, {"orders:read"}, (), "pro", None, signing.ed25519_public_key(private), ""
    )
    assert secret is None and key.secret is None
    verdict = await env.one(env.request(key.key_id, private, permission="orders:read"))
    assert verdict.principal is not None and verdict.principal.tier == "pro"
    # Another private key: refused.
    failed(await env.one(env.request(key.key_id, Ed25519PrivateKey.generate())), "signature wrong")
    # An HMAC-length signature for an Ed25519 key: malformed.
    wrong_scheme = env.request(key.key_id, "tgs_" + "a" * 43)
    failed(await env.one(wrong_scheme), "x-tg-signature malformed")


@sqlite_only
async def test_a_batch_is_answered_in_order_each_request_alone(env: Env) -> None:
    key, secret = await env.hmac_key()
    good = env.request(key.key_id, secret)
    denied = env.request(key.key_id, secret, permission="withdraw")
    fake = env.request(key.key_id[:-1] + ("A" if key.key_id[-1] != "A" else "B"), secret)
    verdicts = await env.service.verify([good, denied, fake, good])
    assert verdicts[1].permission_denied and verdicts[1].principal is None
    failed(verdicts[2], "key id malformed or checksum wrong")
    # The same request twice in one batch: exactly one of the two spends the nonce.
    twice = sorted([verdicts[0], verdicts[3]], key=lambda v: v.principal is None)
    assert twice[0].principal is not None
    failed(twice[1], "nonce replayed")


# --- the misuse suite ------------------------------------------------------------------------------------------


@sqlite_only
async def test_an_altered_body_byte_fails(env: Env) -> None:
    key, secret = await env.hmac_key()
    signed = env.request(key.key_id, secret)
    altered = BODY[:-1] + bytes([BODY[-1] ^ 1])
    assert signing.body_digest(altered) != signed.body_sha256
    tampered = signing.SignedRequest(
        **{**_fields(signed), "body_sha256": signing.body_digest(altered)},
    )
    failed(await env.one(tampered), "signature wrong")
    other_path = signing.SignedRequest(
        **{**_fields(signed), "path": PATH.replace("PlaceOrder", "CancelOrder")}
    )
    failed(await env.one(other_path), "signature wrong")


def _fields(request: signing.SignedRequest) -> dict[str, str]:
    return {name: getattr(request, name) for name in signing.SignedRequest.__slots__}


@sqlite_only
async def test_a_replayed_nonce_fails(env: Env) -> None:
    key, secret = await env.hmac_key()
    request = env.request(key.key_id, secret)
    assert (await env.one(request)).principal is not None
    failed(await env.one(request), "nonce replayed")
    # A nonce is per key: the same nonce under another key is its own.
    other, other_secret = await env.hmac_key()
    assert (await env.one(env.request(other.key_id, other_secret, nonce=request.nonce))).principal is not None


@pytest.mark.parametrize("hot_backend", ["redis"], indirect=True)
@sqlite_only
async def test_a_replayed_nonce_fails_across_two_replicas_sharing_redis(
    env: Env, hot_backend: HotBackend
) -> None:
    key, secret = await env.hmac_key()
    replica_b = env.another_service(await hot_backend.open())  # a second Redis client: a second replica
    request = env.request(key.key_id, secret)
    assert (await env.one(request)).principal is not None
    failed(await env.one(request, replica_b), "nonce replayed")
    # And the other way round, concurrently: exactly one of the two replicas accepts.
    fresh = env.request(key.key_id, secret)
    a, b = await asyncio.gather(env.service.verify([fresh]), replica_b.verify([fresh]))
    assert sorted([a[0].principal is not None, b[0].principal is not None]) == [False, True]


@sqlite_only
async def test_a_bad_signature_cannot_burn_the_nonce_of_another(env: Env) -> None:
    key, secret = await env.hmac_key()
    honest = env.request(key.key_id, secret)
    forged = signing.SignedRequest(**{**_fields(honest), "signature": "0" * 64})
    failed(await env.one(forged), "signature wrong")
    assert (await env.one(honest)).principal is not None  # its nonce was not spent by the forgery


@sqlite_only
async def test_a_bad_checksum_is_refused_without_a_store_lookup(env: Env) -> None:
    key, secret = await env.hmac_key()
    lookups = env.store.lookups
    for fake in (
        key.key_id[:-1] + ("x" if key.key_id[-1] != "x" else "y"),  # checksum altered
        key.key_id[:10] + ("Q" if key.key_id[10] != "Q" else "R") + key.key_id[11:],  # body altered
        "tgk_" + "a" * 38,
        "AKIA" + "A" * 16,
        "",
    ):
        failed(await env.one(env.request(fake, secret)), "key id malformed or checksum wrong")
    assert env.store.lookups == lookups
    failed(await env.one(env.request(signing.new_key_id(os.urandom), secret)), "key unknown")
    assert env.store.lookups == lookups + 1


@sqlite_only
async def test_a_batch_reads_each_key_once_and_the_next_batch_reads_it_again(env: Env) -> None:
    """A guard's batch of calls signed with the same keys costs one store read per distinct key; nothing is kept
    between batches, so a key revoked after one batch is refused by the next."""
    key, secret = await env.hmac_key()
    other, other_secret = await env.hmac_key()
    batch = [env.request(key.key_id, secret) for _ in range(5)] + [env.request(other.key_id, other_secret)]
    batch.append(env.request(key.key_id[:-1] + ("x" if key.key_id[-1] != "x" else "y"), secret))  # a fake
    lookups = env.store.lookups
    verdicts = await env.service.verify(batch)
    assert [v.principal is not None for v in verdicts] == [True] * 6 + [False]
    failed(verdicts[-1], "key id malformed or checksum wrong")
    assert env.store.lookups == lookups + 2
    await env.service.revoke(key.key_id)
    verdicts = await env.service.verify(
        [env.request(key.key_id, secret), env.request(other.key_id, other_secret)]
    )
    failed(verdicts[0], "key revoked")
    assert verdicts[1].principal is not None
    assert env.store.lookups == lookups + 2 + 1 + 2  # the revocation's own read, then this batch's two


@sqlite_only
async def test_an_expired_key_fails(env: Env) -> None:
    key, secret = await env.hmac_key(lifetime_us=DAY_US)
    env.clock.advance(DAY_US - 10_000_000)
    assert (await env.one(env.request(key.key_id, secret))).principal is not None
    env.clock.advance(10_000_000)
    failed(await env.one(env.request(key.key_id, secret)), "key expired")


async def test_a_revoked_key_fails_and_every_guard_hears_of_it(env: Env) -> None:
    key, secret = await env.hmac_key()
    assert (await env.one(env.request(key.key_id, secret))).principal is not None
    revoked = await env.service.revoke(key.key_id)
    assert revoked.revoke_time_us == env.clock()
    failed(await env.one(env.request(key.key_id, secret)), "key revoked")
    revocations = await env.hot.revocations_after(0)
    assert [(r.kind, r.value) for r in revocations] == [(RevocationKind.KEY, key.key_id)]
    assert await env.service.revoke(key.key_id) == revoked  # idempotent: no second revocation
    assert len(await env.hot.revocations_after(0)) == 1
    with pytest.raises(NotFound):
        await env.service.revoke(signing.new_key_id(os.urandom))


@sqlite_only
async def test_rotation_keeps_the_old_secret_only_during_its_grace(env: Env) -> None:
    key, old = await env.hmac_key()
    rotated, new = await env.service.rotate(key.key_id, 30_000_000, None)
    assert new is not None and new != old and rotated.previous_secret == key.secret
    assert (await env.one(env.request(key.key_id, new))).principal is not None
    assert (await env.one(env.request(key.key_id, old))).principal is not None  # within the grace period
    env.clock.advance(30_000_000)
    failed(await env.one(env.request(key.key_id, old)), "signature wrong")  # rotated out
    assert (await env.one(env.request(key.key_id, new))).principal is not None
    # Without a grace period the old secret stops at once.
    _, newest = await env.service.rotate(key.key_id, 0, None)
    assert newest is not None
    failed(await env.one(env.request(key.key_id, new)), "signature wrong")
    assert (await env.one(env.request(key.key_id, newest))).principal is not None


@sqlite_only
async def test_ed25519_rotation_keeps_the_old_public_key_during_its_grace(env: Env) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    key, _ = await env.service.create(
        "u1", ApiKeyKind.ED25519, TRADER, (), "standard", None, signing.ed25519_public_key(old), ""
    )
    with pytest.raises(InvalidArgument):
        await env.service.rotate(key.key_id, 1_000_000, None)
    await env.service.rotate(key.key_id, 1_000_000, signing.ed25519_public_key(new))
    assert (await env.one(env.request(key.key_id, old))).principal is not None
    assert (await env.one(env.request(key.key_id, new))).principal is not None
    env.clock.advance(1_000_000)
    failed(await env.one(env.request(key.key_id, old)), "signature wrong")


@sqlite_only
async def test_a_source_address_outside_the_allow_list_fails(env: Env) -> None:
    key, secret = await env.hmac_key(
        ip_allow_list=["203.0.113.0/24", "2001:db8::/32"], lifetime_us=365 * DAY_US
    )
    assert key.ip_allow_list == ("203.0.113.0/24", "2001:db8::/32")
    for inside in ("203.0.113.5", "203.0.113.255", "2001:db8::1", "::ffff:203.0.113.9"):
        assert (await env.one(env.request(key.key_id, secret, source_ip=inside))).principal is not None, (
            inside
        )
    for outside in ("198.51.100.7", "203.0.114.1", "2001:db9::1", "::1", "::ffff:198.51.100.7"):
        failed(
            await env.one(env.request(key.key_id, secret, source_ip=outside)),
            "source address outside the key's allow-list",
        )
    failed(await env.one(env.request(key.key_id, secret, source_ip="not-an-ip")), "source address malformed")


@sqlite_only
async def test_timestamps_outside_the_window_fail(env: Env) -> None:
    key, secret = await env.hmac_key()
    now = env.now_ms()
    assert (await env.one(env.request(key.key_id, secret, timestamp_ms=now + 1000))).principal is not None
    assert (await env.one(env.request(key.key_id, secret, timestamp_ms=now - 5000))).principal is not None
    failed(
        await env.one(env.request(key.key_id, secret, timestamp_ms=now + 1001)),
        "timestamp too far in the future",
    )
    failed(
        await env.one(env.request(key.key_id, secret, timestamp_ms=now - 5001)),
        "timestamp outside the window (stale)",
    )
    # A request replayed after the window: stale, whatever its nonce.
    request = env.request(key.key_id, secret)
    env.clock.advance(5_001_000)
    failed(await env.one(request), "timestamp outside the window (stale)")


@sqlite_only
async def test_malformed_fields_fail(env: Env) -> None:
    key, secret = await env.hmac_key()
    good = env.request(key.key_id, secret)
    for field, value, cause in (
        ("timestamp", "0" + good.timestamp, "timestamp malformed"),
        ("timestamp", "+" + good.timestamp, "timestamp malformed"),
        ("nonce", "short", "x-tg-nonce malformed"),
        ("signature", good.signature.upper(), "x-tg-signature malformed"),
        ("body_sha256", "", "body_sha256 malformed"),
    ):
        failed(await env.one(signing.SignedRequest(**{**_fields(good), field: value})), cause)
    assert (await env.one(good)).principal is not None


@sqlite_only
async def test_the_wrong_key_fails(env: Env) -> None:
    key, _ = await env.hmac_key()
    _, other_secret = await env.hmac_key()
    failed(await env.one(env.request(key.key_id, other_secret)), "signature wrong")


@sqlite_only
async def test_a_method_outside_the_scopes_is_permission_denied(env: Env) -> None:
    key, secret = await env.hmac_key(scopes={"orders:read"})
    verdict = await env.one(env.request(key.key_id, secret, permission="orders:write"))
    assert verdict.permission_denied and verdict.principal is None and verdict.cause is None
    assert (await env.one(env.request(key.key_id, secret, permission="orders:read"))).principal is not None
    assert (await env.one(env.request(key.key_id, secret, permission=""))).principal is not None


@sqlite_only
async def test_a_key_loses_what_its_owner_loses(env: Env) -> None:
    key, secret = await env.hmac_key()
    env.permissions["u1"] = frozenset({"orders:read"})  # demoted
    env.clock.advance(5_000_000)  # the owner cache's time to live
    verdict = await env.one(env.request(key.key_id, secret))
    assert verdict.permission_denied
    ok = await env.one(env.request(key.key_id, secret, permission="orders:read"))
    assert ok.principal is not None and ok.principal.scopes == frozenset({"orders:read"})


@sqlite_only
async def test_failures_are_logged_with_their_cause_never_a_secret(env: Env) -> None:
    key, secret = await env.hmac_key()
    forged = signing.SignedRequest(**{**_fields(env.request(key.key_id, secret)), "signature": "ab" * 32})
    with capture_logs() as logs:
        await env.one(forged)
    refused = [e for e in logs if e["event"] == "auth.signed_request_refused"]
    assert refused == [
        {
            "event": "auth.signed_request_refused",
            "log_level": "warning",
            "cause": "signature wrong",
            "key_id": key.key_id,
            "source_ip": CLIENT_IP,
            "path": PATH,
        }
    ]
    assert secret not in repr(logs) and "ab" * 32 not in repr(logs)


# --- creation rules --------------------------------------------------------------------------------------------


@sqlite_only
async def test_scopes_never_exceed_the_owners_permissions(env: Env) -> None:
    with pytest.raises(PermissionDenied) as denied:
        await env.hmac_key(user_id="u2", scopes={"orders:read", "orders:write"})
    assert denied.value.reason == "SCOPES_EXCEED_OWNER"
    with pytest.raises(InvalidArgument):
        await env.hmac_key(scopes=set())
    with pytest.raises(NotFound):
        await env.hmac_key(user_id="nobody")
    assert await env.service.list("u2") == []


@sqlite_only
async def test_a_key_without_an_ip_allow_list_expires_within_90_days(env: Env) -> None:
    key, _ = await env.hmac_key()
    assert key.expire_time_us - key.create_time_us <= MAX_UNBOUND_LIFETIME_US
    with pytest.raises(InvalidArgument) as info:
        await env.hmac_key(lifetime_us=MAX_UNBOUND_LIFETIME_US + 1)
    assert info.value.violations[0].field == "lifetime"
    bound, _ = await env.hmac_key(ip_allow_list=["10.0.0.0/8"], lifetime_us=365 * DAY_US)
    assert bound.expire_time_us - bound.create_time_us == 365 * DAY_US


@sqlite_only
async def test_allow_list_entries_are_validated(env: Env) -> None:
    with pytest.raises(InvalidArgument) as info:
        await env.hmac_key(ip_allow_list=["10.0.0.0/8", "10.0.0.1/24", "bogus", "2001:db8::/129"])
    assert [v.field for v in info.value.violations] == [
        "ip_allow_list[1]",
        "ip_allow_list[2]",
        "ip_allow_list[3]",
    ]
    key, _ = await env.hmac_key(ip_allow_list=["192.0.2.7", "2001:DB8::/48"])
    assert key.ip_allow_list == ("192.0.2.7/32", "2001:db8::/48")


@sqlite_only
async def test_kind_and_public_key_must_agree(env: Env) -> None:
    with pytest.raises(InvalidArgument):
        await env.service.create("u1", ApiKeyKind.ED25519, TRADER, (), "standard", None, None, "")
    with pytest.raises(InvalidArgument):
        await env.service.create("u1", ApiKeyKind.ED25519, TRADER, (), "standard", None, b"\x01" * 31, "")
    with pytest.raises(InvalidArgument):
        await env.hmac_key(public_key=b"\x01" * 32)
    with pytest.raises(InvalidArgument):
        await env.hmac_key(tier="Gold Tier")


@sqlite_only
async def test_a_revoked_or_expired_key_is_not_rotated(env: Env) -> None:
    key, _ = await env.hmac_key()
    await env.service.revoke(key.key_id)
    with pytest.raises(Exception, match="revoked"):
        await env.service.rotate(key.key_id, 0, None)
    short, _ = await env.hmac_key(lifetime_us=1_000_000)
    env.clock.advance(1_000_000)
    with pytest.raises(Exception, match="expired"):
        await env.service.rotate(short.key_id, 0, None)


def _the_service_settings_fit(settings: Settings) -> tuple[KeySettingsProtocol, TokenSettings]:
    """Checked by mypy, never run: the auth service's Settings is what ApiKeyService and TokenService read."""
    return settings, settings


# --- lockout: per key (its pair with the source first) and per source address ------------------------------------

STRICT = KeySettings(
    lockout=LockoutSettings(
        pair_threshold=3, account_threshold=6, key_threshold=6, ip_threshold=10, base_s=30.0, max_s=3600.0
    )
)
WRONG_SECRET = "tgs_" + "a" * 43
LOCK_US = 30_000_000


def strict(env: Env) -> ApiKeyService:
    return env.another_service(env.hot, STRICT)


async def bad_signatures(
    env: Env, service: ApiKeyService, key_id: str, source_ip: str, n: int
) -> list[Verdict]:
    return await service.verify([env.request(key_id, WRONG_SECRET, source_ip=source_ip) for _ in range(n)])


@sqlite_only
async def test_bad_signatures_lock_the_key_for_every_address_but_one_address_cannot(env: Env) -> None:
    service = strict(env)
    key, secret = await env.hmac_key()
    # One address alone: its first 3 failures lock its pair and count for the key; more are refused, not counted.
    verdicts = await bad_signatures(env, service, key.key_id, "198.51.100.1", 3)
    assert {v.cause for v in verdicts} == {"signature wrong"}
    for verdict in await bad_signatures(env, service, key.key_id, "198.51.100.1", 10):
        failed(verdict, "key locked for this source")
    failed(
        await env.one(env.request(key.key_id, secret, source_ip="198.51.100.1"), service),
        "key locked for this source",
    )
    # ... and the key still works from everywhere else: one address cannot lock a key out.
    assert (await env.one(env.request(key.key_id, secret), service)).principal is not None
    # The addresses of one IPv6 /64 are one source: 2 + 1 failures lock that /64's pair.
    await bad_signatures(env, service, key.key_id, "2001:db8:1:2::1", 2)
    await bad_signatures(env, service, key.key_id, "2001:db8:1:2::ffff", 1)
    failed(
        await env.one(env.request(key.key_id, secret, source_ip="2001:db8:1:2::7"), service),
        "key locked for this source",
    )
    # The second /64 brought the key to 6 failures: locked for every address, the owner's valid requests too.
    with capture_logs() as logs:
        failed(await env.one(env.request(key.key_id, secret), service), "key locked")
        failed(await env.one(env.request(key.key_id, secret, source_ip="192.0.2.77"), service), "key locked")
    locked = [e for e in logs if e["event"] == "auth.failure"]
    assert [(e["cause"], e["counted"], e["locked"]) for e in locked] == [
        ("key locked", False, "principal")
    ] * 2
    # Another key of the same owner is not affected; the lock ends after its 30 s.
    other, other_secret = await env.hmac_key()
    assert (await env.one(env.request(other.key_id, other_secret), service)).principal is not None
    env.clock.advance(LOCK_US)
    assert (await env.one(env.request(key.key_id, secret), service)).principal is not None


@sqlite_only
async def test_the_locks_are_shared_by_replicas_on_one_hot_state(env: Env, hot_backend: HotBackend) -> None:
    key, secret = await env.hmac_key()
    replica_a, replica_b = strict(env), env.another_service(await hot_backend.open(), STRICT)
    await bad_signatures(env, replica_a, key.key_id, "198.51.100.1", 3)
    await bad_signatures(env, replica_b, key.key_id, "198.51.100.2", 3)
    failed(await env.one(env.request(key.key_id, secret), replica_a), "key locked")
    failed(await env.one(env.request(key.key_id, secret), replica_b), "key locked")


@sqlite_only
async def test_every_kind_of_failure_after_the_key_was_found_counts_for_the_key(env: Env) -> None:
    service = strict(env)
    key, secret = await env.hmac_key(ip_allow_list=["198.51.100.0/24", "2001:db8::/48"])
    now = env.now_ms()
    replayed = env.request(key.key_id, secret, source_ip="198.51.100.9")
    assert (await env.one(replayed, service)).principal is not None
    failures = [
        env.request(key.key_id, secret, timestamp_ms=now - 6000, source_ip="198.51.100.1"),  # stale
        env.request(key.key_id, secret, timestamp_ms=now + 2000, source_ip="198.51.100.1"),  # future
        env.request(key.key_id, secret, source_ip="203.0.113.1"),  # outside the allow-list
        replayed,  # a replayed nonce
        env.request(key.key_id, WRONG_SECRET, source_ip="2001:db8::1"),  # a wrong signature
    ]
    causes = [(await env.one(request, service)).cause for request in failures]
    assert causes == [
        "timestamp outside the window (stale)",
        "timestamp too far in the future",
        "source address outside the key's allow-list",
        "nonce replayed",
        "signature wrong",
    ]
    assert await env.hot.locked_until(f"key:{key.key_id}", env.clock()) is None  # 5 of 6
    assert (await env.one(env.request(key.key_id, WRONG_SECRET, source_ip="2001:db8::2"), service)).cause
    failed(await env.one(env.request(key.key_id, secret, source_ip="198.51.100.9"), service), "key locked")


@sqlite_only
async def test_the_owners_success_never_clears_the_keys_count_only_its_own_pair(env: Env) -> None:
    service = strict(env)
    key, secret = await env.hmac_key()
    await bad_signatures(env, service, key.key_id, "198.51.100.1", 3)  # key: 3
    await bad_signatures(env, service, key.key_id, "198.51.100.2", 2)  # key: 5
    # The owner's traffic from that very address clears its pair (2 more failures do not lock it) ...
    assert (await env.one(env.request(key.key_id, secret, source_ip="198.51.100.2"), service)).ok
    for _ in range(5):
        assert (await env.one(env.request(key.key_id, secret), service)).ok
    # ... but not the key's count: the next failure, from anywhere, is its 6th.
    failed((await bad_signatures(env, service, key.key_id, "198.51.100.3", 1))[0], "signature wrong")
    failed(await env.one(env.request(key.key_id, secret), service), "key locked")
    assert (
        await env.hot.locked_until(f"pair:key:{key.key_id}#{key.version}|198.51.100.2", env.clock()) is None
    )


@sqlite_only
async def test_attempts_refused_while_locked_do_not_extend_the_lock(env: Env) -> None:
    service = strict(env)
    key, secret = await env.hmac_key()
    for source in ("198.51.100.1", "198.51.100.2"):
        await bad_signatures(env, service, key.key_id, source, 3)
    start = env.clock()
    assert await env.hot.locked_until(f"key:{key.key_id}", start) == start + LOCK_US
    # 20 more bad signatures from 2 fresh addresses during the lock: refused before any signature check, not
    # counted (for the key, the pairs or the addresses: 10 would lock an address, 3 a pair).
    for source in ("192.0.2.1", "192.0.2.2"):
        for verdict in await bad_signatures(env, service, key.key_id, source, 10):
            failed(verdict, "key locked")
    assert await env.hot.locked_until(f"key:{key.key_id}", env.clock()) == start + LOCK_US
    env.clock.advance(LOCK_US)
    assert (await env.one(env.request(key.key_id, secret, source_ip="192.0.2.1"), service)).ok
    # The next failure is the key's 7th (not its 27th): a lock of 2 x 30 s, not the maximum.
    await bad_signatures(env, service, key.key_id, "192.0.2.1", 1)
    now = env.clock()
    assert await env.hot.locked_until(f"key:{key.key_id}", now) == now + 2 * LOCK_US
    # Neither did the refused attempts count for their addresses or pairs.
    assert await env.hot.locked_until("ip:192.0.2.2", now) is None
    assert await env.hot.locked_until(f"pair:key:{key.key_id}#{key.version}|192.0.2.2", now) is None


@sqlite_only
async def test_a_rotation_unlocks_a_locked_key(env: Env) -> None:
    service = strict(env)
    key, _ = await env.hmac_key()
    for source in ("198.51.100.1", "198.51.100.2"):
        await bad_signatures(env, service, key.key_id, source, 3)
    failed(await env.one(env.request(key.key_id, WRONG_SECRET), service), "key locked")
    with capture_logs() as logs:
        rotated, new = await service.rotate(key.key_id, 0, None)
    assert new is not None and rotated.version == key.version + 1
    assert [e["cause"] for e in logs if e["event"] == "auth.unlocked"] == ["key rotated"]
    # Unlocked for every address, including the ones whose pairs were locked (a new epoch).
    for source in ("198.51.100.1", "198.51.100.2", CLIENT_IP):
        assert (await env.one(env.request(key.key_id, new, source_ip=source), service)).ok


@sqlite_only
async def test_one_source_hammering_bad_key_ids_locks_that_source_not_others(env: Env) -> None:
    service = strict(env)
    key, secret = await env.hmac_key()
    attacker = "198.51.100.66"
    lookups = env.store.lookups
    fakes = [key.key_id[:-1] + ("x" if key.key_id[-1] != "x" else "y"), "tgk_" + "a" * 38, "AKIA" + "A" * 16]
    bad_checksums = [env.request(fake, secret, source_ip=attacker) for fake in fakes]
    verdicts = await service.verify(bad_checksums)
    assert {v.cause for v in verdicts} == {"key id malformed or checksum wrong"}
    assert env.store.lookups == lookups  # counted for the address, still without a store lookup
    unknown = [env.request(signing.new_key_id(os.urandom), secret, source_ip=attacker) for _ in range(7)]
    verdicts = await service.verify(unknown)
    assert {v.cause for v in verdicts} == {"key unknown"}
    # 10 failures: the address is locked, for every key, with a real key and a valid signature too.
    failed(await env.one(env.request(key.key_id, secret, source_ip=attacker), service), "source locked")
    failed(await env.one(env.request(fakes[0], secret, source_ip=attacker), service), "source locked")
    # Other addresses, and the key itself, are untouched (unknown key ids never count for a key).
    assert (await env.one(env.request(key.key_id, secret), service)).ok
    assert await env.hot.locked_until(f"key:{key.key_id}", env.clock()) is None
    # Refused while locked: not counted, so the lock is not extended.
    start = await env.hot.locked_until(f"ip:{attacker}", env.clock())
    assert start is not None
    await service.verify([env.request(signing.new_key_id(os.urandom), secret, source_ip=attacker)] * 5)
    assert await env.hot.locked_until(f"ip:{attacker}", env.clock()) == start
    env.clock.advance(LOCK_US)
    assert (await env.one(env.request(key.key_id, secret, source_ip=attacker), service)).ok


@sqlite_only
async def test_a_batch_reads_each_lock_once(env: Env, hot_backend: HotBackend) -> None:
    """The lock check costs one `locked_until` per distinct address, key and (key, address) pair of a batch,
    all before any signature is checked; a batch of one key from one address: three."""
    reads: list[str] = []
    hot = env.hot

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(hot, name)

        async def locked_until(self, subject: str, now_us: int) -> int | None:
            reads.append(subject)
            return await hot.locked_until(subject, now_us)

    service = env.another_service(Counting(), STRICT)
    key, secret = await env.hmac_key()
    verdicts = await service.verify([env.request(key.key_id, secret) for _ in range(8)])
    assert all(v.ok for v in verdicts)
    assert sorted(reads) == sorted(
        [f"ip:{CLIENT_IP}", f"key:{key.key_id}", f"pair:key:{key.key_id}#{key.version}|{CLIENT_IP}"]
    )

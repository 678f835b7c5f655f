"""The user core (services/auth/users.py) on the real stores (SQLite, PostgreSQL), the real hot states (in process,
Redis), the real key vault (seeds sealed with the user id) and the real token service.

Misuse: a TOTP code accepted once then refused, also by a second replica sharing Redis and in a race between two
replicas; the mfa_token spent by its first use; lockout through login (the pair first, other addresses still in);
an unknown user, a wrong password, a locked account, a wrong and a reused code all the same opaque error with the
same status, and Argon2id run for unknown users as for known ones."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import statistics
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import argon2
import jwt
import pytest
from argon2 import PasswordHasher, Type
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from services.auth import recovery
from services.auth.hot import HotState
from services.auth.model import RevocationKind, TokenPair, User
from services.auth.passwords import DUMMY_HASH, Passwords
from services.auth.rbac import Rbac
from services.auth.settings import Settings
from services.auth.store import AuthStore
from services.auth.tokens import TokenService
from services.auth.totp import TOTP
from services.auth.users import LoginResult, UserService, normalize_username
from services.auth.vault_client import VaultClient
from tests.services.auth.conftest import AuthDatabase, HotBackend
from tests.services.auth.test_passwords import RecordingHasher
from tradeguard.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OpaqueError,
    Unauthenticated,
)
from tradeguard.mesh.server import ServerConfig
from tradeguard.rpc.errors import to_rpc_status
from tradeguard.testing import FakeClock

PASSWORD = "a long trading passphrase"
HOME_IP = "198.51.100.10"
ATTACKER_IP = "203.0.113.66"
THUMBPRINT = "Zr0Fj0Ab0Qz8m1nq7bGmQ2Yw9e0c3xk4E5t6U7v8W9A"


def auth_settings(tmp_path: Path) -> Settings:
    return Settings(server=ServerConfig(name="auth", port=0, home=tmp_path), database_url="sqlite:///unused")


@dataclass
class Replica:
    """One auth replica's cores over a store and a hot state."""

    users: UserService
    tokens: TokenService
    rbac: Rbac
    store: AuthStore
    hot: HotState
    hasher: RecordingHasher


async def replica(
    store: AuthStore, hot: HotState, vault: VaultClient, clock: FakeClock, tmp_path: Path
) -> Replica:
    config = auth_settings(tmp_path)
    tokens = TokenService(store, hot, vault, clock, os.urandom, config)
    rbac = Rbac(store, clock, mfa_permissions=config.mfa_required_permissions)
    await rbac.load()
    hasher = RecordingHasher()
    users = UserService(
        store, hot, vault, tokens, rbac, clock, os.urandom, config, passwords=Passwords(hasher)
    )
    return Replica(users, tokens, rbac, store, hot, hasher)


@pytest.fixture
async def one(
    auth_store: AuthStore, hot_state: HotState, vault: VaultClient, clock: FakeClock, tmp_path: Path
) -> Replica:
    return await replica(auth_store, hot_state, vault, clock, tmp_path)


def claims(tokens: TokenPair) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(tokens.access_token, options={"verify_signature": False})
    return decoded


def seed_of(uri: str) -> bytes:
    secret = parse_qs(urlparse(uri).query)["secret"][0]
    return base64.b32decode(secret + "=" * (-len(secret) % 8))


async def enrolled(
    r: Replica, clock: FakeClock, username: str = "tara", roles: Sequence[str] = ("trader",)
) -> tuple[User, bytes, list[str]]:
    """A user with TOTP confirmed: (user, seed, recovery codes); the clock then moves to the next step."""
    await r.users.create_user(username, PASSWORD, "acct-1", roles)
    uri = await r.users.begin_totp(username, PASSWORD, HOME_IP)
    seed = seed_of(uri)
    codes = await r.users.confirm_totp(username, PASSWORD, TOTP.code_at(seed, clock()), HOME_IP)
    clock.advance_s(30)
    user = await r.store.get_user_by_name(username)
    assert user is not None
    return user, seed, codes


async def mfa_token(r: Replica, username: str = "tara", source: str = HOME_IP) -> str:
    result = await r.users.login(username, PASSWORD, source)
    assert result.tokens is None and result.mfa_token is not None
    return result.mfa_token


# --- operators ----------------------------------------------------------------------------------------------


async def test_create_and_get_a_user(one: Replica, clock: FakeClock) -> None:
    user = await one.users.create_user("alice", PASSWORD, "acct-1", ["viewer"])
    assert user.username == "alice" and user.account_id == "acct-1" and user.roles == ("viewer",)
    assert user.user_id.startswith("usr_") and len(user.user_id) == 30
    assert user.create_time_us == clock.now_us and user.version == 1
    assert PASSWORD not in user.password_hash
    assert argon2.extract_parameters(user.password_hash).type is Type.ID
    assert await one.users.get_user(user.user_id) == user
    with pytest.raises(NotFound):
        await one.users.get_user("usr_" + "0" * 26)
    with pytest.raises(InvalidArgument) as error:
        await one.users.get_user("alice")
    assert [v.field for v in error.value.violations] == ["user_id"]


async def test_create_user_names_every_bad_field(one: Replica) -> None:
    with pytest.raises(InvalidArgument) as error:
        await one.users.create_user("a", "short", "", ["viewer", "ghost", "Not A Role"])
    assert [v.field for v in error.value.violations] == [
        "username",
        "password",
        "account_id",
        "roles[1]",
        "roles[2]",
    ]
    assert "short" not in error.value.message
    with pytest.raises(InvalidArgument) as error:
        await one.users.create_user("alice.trader", "alice.trader!!", "acct-1", [])
    assert [v.field for v in error.value.violations] == ["password"]
    assert await one.store.get_user_by_name("alice.trader") is None


async def test_usernames_are_unique_after_nfkc(one: Replica) -> None:
    await one.users.create_user("alice", PASSWORD, "acct-1", ["viewer"])
    assert normalize_username("\uff41lice") == "alice"  # fullwidth a
    with pytest.raises(AlreadyExists):
        await one.users.create_user("\uff41lice", PASSWORD, "acct-2", ["viewer"])
    result = await one.users.login("\uff41lice", PASSWORD, HOME_IP)  # the same user logs in either way
    assert result.tokens is not None


async def test_set_roles_revokes_the_users_tokens(one: Replica) -> None:
    user = await one.users.create_user("vic", PASSWORD, "acct-1", ["viewer"])
    first = await one.users.login("vic", PASSWORD, HOME_IP)
    assert first.tokens is not None and claims(first.tokens)["scope"] == "orders:read"
    before = await one.hot.revocations_after(0)
    updated = await one.users.set_roles(user.user_id, ["admin"])
    assert updated.roles == ("admin",) and updated.version == user.version + 1
    revoked = [r for r in await one.hot.revocations_after(0) if r not in before]
    assert [(r.kind, r.value) for r in revoked] == [(RevocationKind.USER, user.user_id)]

    async def load(user_id: str) -> tuple[User, frozenset[str]] | None:
        loaded = await one.store.get_user(user_id)
        return None if loaded is None else (loaded, one.rbac.permissions_of(loaded.roles))

    with pytest.raises(Unauthenticated):
        await one.tokens.refresh(first.tokens.refresh_token, None, load)
    with pytest.raises(InvalidArgument) as error:
        await one.users.set_roles(user.user_id, ["ghost"])
    assert [v.field for v in error.value.violations] == ["roles[0]"]
    with pytest.raises(NotFound):
        await one.users.set_roles("usr_" + "1" * 26, ["viewer"])


# --- login without a second factor ----------------------------------------------------------------------------


async def test_login_without_mfa_issues_tokens(one: Replica) -> None:
    user = await one.users.create_user("vera", PASSWORD, "acct-9", ["viewer"])
    result = await one.users.login("vera", PASSWORD, HOME_IP, THUMBPRINT)
    assert result.tokens is not None and result.mfa_token is None
    claim = claims(result.tokens)
    assert claim["sub"] == user.user_id and claim["acct"] == "acct-9"
    assert claim["scope"] == "orders:read" and claim["amr"] == ["pwd"]
    assert claim["cnf"] == {"x5t#S256": THUMBPRINT}
    assert result.tokens.access_token not in repr(result) and result.tokens.refresh_token not in repr(result)


async def test_a_trader_must_enrol_before_getting_tokens(one: Replica) -> None:
    await one.users.create_user("tom", PASSWORD, "acct-1", ["trader"])
    with pytest.raises(FailedPrecondition) as error:
        await one.users.login("tom", PASSWORD, HOME_IP)
    assert error.value.reason == "MFA_ENROLLMENT_REQUIRED"
    with pytest.raises(Unauthenticated):  # only after the right password: nothing to learn without it
        await one.users.login("tom", PASSWORD + "x", HOME_IP)


async def test_login_rehashes_a_password_hashed_with_old_parameters(one: Replica) -> None:
    user = await one.users.create_user("olga", PASSWORD, "acct-1", ["viewer"])
    old = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1, type=Type.ID).hash(PASSWORD)
    assert await one.store.update_user(replace(user, password_hash=old, version=2), 1)
    assert (await one.users.login("olga", PASSWORD, HOME_IP)).tokens is not None
    stored = await one.store.get_user(user.user_id)
    assert stored is not None and stored.password_hash != old
    assert argon2.extract_parameters(stored.password_hash).memory_cost == 19 * 1024
    assert (await one.users.login("olga", PASSWORD, HOME_IP)).tokens is not None


# --- TOTP enrolment -------------------------------------------------------------------------------------------


async def test_enrolment_seals_the_seed_to_the_user(
    one: Replica, vault: VaultClient, clock: FakeClock
) -> None:
    user = await one.users.create_user("tara", PASSWORD, "acct-1", ["trader"])
    uri = await one.users.begin_totp("tara", PASSWORD, HOME_IP)
    assert uri.startswith("otpauth://totp/Tradeguard:tara?") and "issuer=Tradeguard" in uri
    seed = seed_of(uri)
    pending = await one.store.get_user(user.user_id)
    assert pending is not None and pending.totp_seed is None and pending.totp_pending_seed is not None
    sealed = pending.totp_pending_seed
    assert base64.b32encode(seed).decode().rstrip("=") not in sealed
    assert await vault.open(sealed, user.user_id.encode()) == seed
    with pytest.raises(OpaqueError):
        await vault.open(sealed, b"usr_someone_else")  # bound to its user by the associated data
    codes = await one.users.confirm_totp("tara", PASSWORD, TOTP.code_at(seed, clock()), HOME_IP)
    assert len(codes) == recovery.COUNT == 10 and len(set(codes)) == 10
    confirmed = await one.store.get_user(user.user_id)
    assert confirmed is not None and confirmed.totp_seed == sealed and confirmed.totp_pending_seed is None
    assert await one.store.unused_recovery_codes(user.user_id) == 10


async def test_enrolment_misuse(one: Replica, clock: FakeClock) -> None:
    await one.users.create_user("tara", PASSWORD, "acct-1", ["trader"])
    with pytest.raises(FailedPrecondition) as error:
        await one.users.confirm_totp("tara", PASSWORD, "123456", HOME_IP)
    assert error.value.reason == "MFA_ENROLLMENT_NOT_STARTED"
    with pytest.raises(Unauthenticated):
        await one.users.begin_totp("tara", "wrong password!", HOME_IP)
    seed = seed_of(await one.users.begin_totp("tara", PASSWORD, HOME_IP))
    wrong = f"{(int(TOTP.code_at(seed, clock())) + 1) % 1_000_000:06d}"
    with pytest.raises(Unauthenticated):
        await one.users.confirm_totp("tara", PASSWORD, wrong, HOME_IP)
    with pytest.raises(Unauthenticated):
        await one.users.confirm_totp("tara", "wrong password!", TOTP.code_at(seed, clock()), HOME_IP)
    await one.users.confirm_totp("tara", PASSWORD, TOTP.code_at(seed, clock()), HOME_IP)
    with pytest.raises(FailedPrecondition) as error:  # a password alone never replaces the second factor
        await one.users.begin_totp("tara", PASSWORD, HOME_IP)
    assert error.value.reason == "MFA_ALREADY_ENROLLED"


async def test_a_new_begin_replaces_a_pending_seed(one: Replica, clock: FakeClock) -> None:
    await one.users.create_user("tara", PASSWORD, "acct-1", ["trader"])
    first = seed_of(await one.users.begin_totp("tara", PASSWORD, HOME_IP))
    second = seed_of(await one.users.begin_totp("tara", PASSWORD, HOME_IP))
    assert first != second
    with pytest.raises(Unauthenticated):
        await one.users.confirm_totp("tara", PASSWORD, TOTP.code_at(first, clock()), HOME_IP)
    await one.users.confirm_totp("tara", PASSWORD, TOTP.code_at(second, clock()), HOME_IP)


# --- the second factor ----------------------------------------------------------------------------------------


async def test_login_with_totp(one: Replica, clock: FakeClock) -> None:
    user, seed, _ = await enrolled(one, clock)
    result = await one.users.login("tara", PASSWORD, HOME_IP)
    assert result.tokens is None and result.mfa_token is not None
    assert result.mfa_expires_in_us == 300_000_000
    assert len(result.mfa_token) == 43 and result.mfa_token not in repr(result)
    tokens = await one.users.verify_mfa(
        result.mfa_token, TOTP.code_at(seed, clock()), None, HOME_IP, THUMBPRINT
    )
    claim = claims(tokens)
    assert claim["sub"] == user.user_id and claim["amr"] == ["pwd", "otp"]
    assert set(claim["scope"].split()) == {"orders:read", "orders:write"}
    assert claim["cnf"] == {"x5t#S256": THUMBPRINT}


async def test_a_code_is_accepted_once_and_never_an_older_one(one: Replica, clock: FakeClock) -> None:
    _, seed, _ = await enrolled(one, clock)
    code = TOTP.code_at(seed, clock())
    await one.users.verify_mfa(await mfa_token(one), code, None, HOME_IP)
    with pytest.raises(Unauthenticated) as error:
        await one.users.verify_mfa(await mfa_token(one), code, None, HOME_IP)  # the same code again
    assert "reused" in error.value.cause
    previous = TOTP.code(seed, TOTP.step_at(clock()) - 1)  # within ±1 step, but older than the accepted one
    with pytest.raises(Unauthenticated):
        await one.users.verify_mfa(await mfa_token(one), previous, None, HOME_IP)
    clock.advance_s(30)
    await one.users.verify_mfa(await mfa_token(one), TOTP.code_at(seed, clock()), None, HOME_IP)


async def test_the_enrolment_code_cannot_log_in(one: Replica, clock: FakeClock) -> None:
    await one.users.create_user("tara", PASSWORD, "acct-1", ["trader"])
    seed = seed_of(await one.users.begin_totp("tara", PASSWORD, HOME_IP))
    code = TOTP.code_at(seed, clock())
    await one.users.confirm_totp("tara", PASSWORD, code, HOME_IP)
    with pytest.raises(Unauthenticated):
        await one.users.verify_mfa(await mfa_token(one), code, None, HOME_IP)


async def test_the_mfa_token_is_spent_by_its_first_use(one: Replica, clock: FakeClock) -> None:
    _, seed, _ = await enrolled(one, clock)
    token = await mfa_token(one)
    wrong = f"{(int(TOTP.code_at(seed, clock())) + 1) % 1_000_000:06d}"
    with pytest.raises(Unauthenticated):
        await one.users.verify_mfa(token, wrong, None, HOME_IP)
    with pytest.raises(Unauthenticated) as error:  # the right code now: the token is gone
        await one.users.verify_mfa(token, TOTP.code_at(seed, clock()), None, HOME_IP)
    assert "mfa token" in error.value.cause
    with pytest.raises(Unauthenticated):
        await one.users.verify_mfa("A" * 43, TOTP.code_at(seed, clock()), None, HOME_IP)  # never issued
    with pytest.raises(InvalidArgument) as bad:
        await one.users.verify_mfa(await mfa_token(one), "123456", "abcd-efgh-jkmn-pqrs", HOME_IP)
    assert [v.field for v in bad.value.violations] == ["factor"]
    with pytest.raises(InvalidArgument):
        await one.users.verify_mfa(await mfa_token(one), None, None, HOME_IP)


@pytest.mark.parametrize(
    "hot_backend", ["memory"], indirect=True
)  # expiry by the fake clock (Redis: its own TTL)
async def test_the_mfa_token_expires(one: Replica, clock: FakeClock) -> None:
    _, seed, _ = await enrolled(one, clock)
    token = await mfa_token(one)
    clock.advance_s(301)
    with pytest.raises(Unauthenticated):
        await one.users.verify_mfa(token, TOTP.code_at(seed, clock()), None, HOME_IP)


async def test_recovery_codes_work_once_each(one: Replica, auth_db: AuthDatabase, clock: FakeClock) -> None:
    user, _, codes = await enrolled(one, clock)
    stored = {row[0] for row in auth_db.execute("SELECT code_hash FROM {schema}.recovery_codes")}
    assert stored == {recovery.hash_code(code) for code in codes}  # SHA-256 hex, never the codes
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in stored)
    tokens = await one.users.verify_mfa(await mfa_token(one), None, codes[0], HOME_IP)
    assert claims(tokens)["amr"] == ["pwd", "otp"]
    assert await one.store.unused_recovery_codes(user.user_id) == 9
    with pytest.raises(Unauthenticated):
        await one.users.verify_mfa(await mfa_token(one), None, codes[0], HOME_IP)  # spent
    typed = codes[1].upper().replace("-", " ")  # forgiving typing
    await one.users.verify_mfa(await mfa_token(one), None, typed, HOME_IP)
    with pytest.raises(Unauthenticated):
        await one.users.verify_mfa(await mfa_token(one), None, "0000-0000-0000-0000", HOME_IP)
    assert await one.store.unused_recovery_codes(user.user_id) == 8


# --- two replicas sharing Redis ------------------------------------------------------------------------------


@pytest.mark.parametrize("hot_backend", ["redis"], indirect=True)
async def test_two_replicas_sharing_redis_accept_a_code_once(
    auth_db: AuthDatabase, hot_backend: HotBackend, vault: VaultClient, clock: FakeClock, tmp_path: Path
) -> None:
    a = await replica(await auth_db.open(), await hot_backend.open(), vault, clock, tmp_path)
    b = await replica(await auth_db.open(), await hot_backend.open(), vault, clock, tmp_path)
    assert a.hot is not b.hot
    _, seed, _ = await enrolled(a, clock)
    code = TOTP.code_at(seed, clock())
    await a.users.verify_mfa(await mfa_token(a), code, None, HOME_IP)
    with pytest.raises(Unauthenticated):
        await b.users.verify_mfa(await mfa_token(b), code, None, HOME_IP)  # the other replica refuses it
    # A challenge made by one replica is answered by the other (a load balancer picks either)...
    clock.advance_s(30)
    code = TOTP.code_at(seed, clock())
    token_a, token_b = await mfa_token(a), await mfa_token(b)
    # ...and two replicas racing with the same fresh code: exactly one wins.
    outcomes = await asyncio.gather(
        b.users.verify_mfa(token_a, code, None, HOME_IP),
        a.users.verify_mfa(token_b, code, None, HOME_IP),
        return_exceptions=True,
    )
    assert sum(isinstance(o, TokenPair) for o in outcomes) == 1
    assert sum(isinstance(o, Unauthenticated) for o in outcomes) == 1


# --- lockout through login ------------------------------------------------------------------------------------


async def test_wrong_passwords_lock_the_pair_not_the_user(one: Replica) -> None:
    user = await one.users.create_user("vera", PASSWORD, "acct-1", ["viewer"])
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            await one.users.login("vera", "not the password", ATTACKER_IP)
    with pytest.raises(Unauthenticated) as error:  # the right password from the attacker's address: locked
        await one.users.login("vera", PASSWORD, ATTACKER_IP)
    assert "locked (pair)" in error.value.cause
    assert (await one.users.login("vera", PASSWORD, HOME_IP)).tokens is not None  # the user is not locked out
    assert not await one.users.locked(user)
    await one.users.unlock(user.user_id)  # an operator releases the pair too
    assert (await one.users.login("vera", PASSWORD, ATTACKER_IP)).tokens is not None


async def test_many_addresses_lock_the_user_and_unlock_releases_it(one: Replica, clock: FakeClock) -> None:
    user = await one.users.create_user("vera", PASSWORD, "acct-1", ["viewer"])
    for i in range(20):
        with pytest.raises(Unauthenticated):
            await one.users.login("vera", "not the password", f"203.0.113.{i}")
    assert await one.users.locked(user)
    with pytest.raises(Unauthenticated) as error:
        await one.users.login("vera", PASSWORD, HOME_IP)
    assert error.value.cause == "locked (principal)"
    await one.users.unlock(user.user_id)
    assert not await one.users.locked(user)
    assert (await one.users.login("vera", PASSWORD, HOME_IP)).tokens is not None


async def test_wrong_codes_lock_too(one: Replica, clock: FakeClock) -> None:
    """Each guess at a code costs a login, and five wrong ones lock the pair: the right code is then refused."""
    _, seed, _ = await enrolled(one, clock)
    wrong = f"{(int(TOTP.code_at(seed, clock())) + 1) % 1_000_000:06d}"
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            await one.users.verify_mfa(await mfa_token(one, source=ATTACKER_IP), wrong, None, ATTACKER_IP)
    with pytest.raises(Unauthenticated):
        await one.users.login("tara", PASSWORD, ATTACKER_IP)


# --- unknown and known users are indistinguishable -------------------------------------------------------------


async def test_every_failure_is_the_same_opaque_error(one: Replica, clock: FakeClock) -> None:
    _, seed, _ = await enrolled(one, clock)
    await one.users.create_user("lara", PASSWORD, "acct-1", ["viewer"])
    for i in range(5):
        with pytest.raises(Unauthenticated):
            await one.users.login("lara", "not the password", ATTACKER_IP)
    code = TOTP.code_at(seed, clock())
    await one.users.verify_mfa(await mfa_token(one), code, None, HOME_IP)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    token_wrong, token_reused = await mfa_token(one), await mfa_token(one)

    attempts: dict[str, Coroutine[Any, Any, object]] = {
        "unknown user": one.users.login("nobody", PASSWORD, HOME_IP),
        "wrong password": one.users.login("tara", "not the password", HOME_IP),
        "locked": one.users.login("lara", PASSWORD, ATTACKER_IP),
        "wrong code": one.users.verify_mfa(token_wrong, wrong, None, HOME_IP),
        "reused code": one.users.verify_mfa(token_reused, code, None, HOME_IP),
        "malformed username": one.users.login("x", PASSWORD, HOME_IP),
    }
    errors: dict[str, Unauthenticated] = {}
    for name, attempt in attempts.items():
        with pytest.raises(Unauthenticated) as error:
            await attempt
        errors[name] = error.value
    seen = {
        (type(e), str(e), e.message, e.reason, e.code, tuple(e.metadata.items())) for e in errors.values()
    }
    assert len(seen) == 1  # one type, message, reason, code, no metadata
    statuses = set()
    for e in errors.values():
        code_, status, trailers = to_rpc_status(e)
        statuses.add((code_, status.SerializeToString(deterministic=True), tuple(trailers)))
    assert len(statuses) == 1  # byte-identical on the wire
    assert len({e.cause for e in errors.values()}) == len(errors)  # the log tells them apart


async def test_argon2_runs_for_unknown_users_as_for_known_ones(one: Replica) -> None:
    user = await one.users.create_user("vera", PASSWORD, "acct-1", ["viewer"])
    one.hasher.verified.clear()
    for username in ("vera", "nobody", "x", "y" * 5000):
        with pytest.raises(Unauthenticated):
            await one.users.login(username, "not the password", HOME_IP)
    assert [h for h, _ in one.hasher.verified] == [user.password_hash, DUMMY_HASH, DUMMY_HASH, DUMMY_HASH]
    one.hasher.verified.clear()
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            await one.users.login("vera", "not the password", ATTACKER_IP)
    with pytest.raises(Unauthenticated):
        await one.users.login("vera", PASSWORD, ATTACKER_IP)  # locked: the hash still runs
    assert [h for h, _ in one.hasher.verified] == [user.password_hash] * 6


@pytest.mark.parametrize("auth_db", ["sqlite"], indirect=True)
@pytest.mark.parametrize("hot_backend", ["memory"], indirect=True)
async def test_unknown_and_known_users_take_similar_time(one: Replica) -> None:
    """Medians of interleaved attempts (Argon2id dominates either way); loose bounds for a shared 2-core box."""
    await one.users.create_user("vera", PASSWORD, "acct-1", ["viewer"])
    durations: dict[str, list[float]] = {"known": [], "unknown": []}
    for i in range(7):
        for kind, name in (("known", "vera"), ("unknown", f"ghost{i}")):
            start = time.perf_counter()
            with pytest.raises(Unauthenticated):
                await one.users.login(name, "not the password", f"198.18.{i}.1")
            durations[kind].append(time.perf_counter() - start)
    known, unknown = statistics.median(durations["known"]), statistics.median(durations["unknown"])
    assert 0.5 < unknown / known < 2.0, (known, unknown)


# --- what is logged --------------------------------------------------------------------------------------------


async def test_logs_hold_causes_and_never_a_secret(one: Replica, clock: FakeClock) -> None:
    with capture_logs() as logs:
        user, seed, codes = await enrolled(one, clock)
        token = await mfa_token(one)
        code = TOTP.code_at(seed, clock())
        await one.users.verify_mfa(token, code, None, HOME_IP)
        with pytest.raises(Unauthenticated):
            await one.users.login("tara", "not the password", HOME_IP)
        with pytest.raises(Unauthenticated):
            await one.users.login("my secret typed as a username", PASSWORD, HOME_IP)
        with pytest.raises(Unauthenticated):
            await one.users.login("MySecretPassphrase2026", PASSWORD, HOME_IP)
        await one.users.verify_mfa(await mfa_token(one), None, codes[0], HOME_IP)
    text = repr(logs)
    secrets_ = [PASSWORD, "not the password", "my secret typed as a username", "MySecretPassphrase2026"]
    secrets_ += [token, code, *codes]
    secrets_ += [base64.b32encode(seed).decode().rstrip("=")]
    assert not [s for s in secrets_ if s in text]
    causes = [line["cause"] for line in logs if line["event"] == "auth.failure"]
    assert causes == ["wrong password", "malformed username", "unknown user"]
    events = [line["event"] for line in logs]
    for event in (
        "auth.user_created",
        "auth.totp_enrolment_started",
        "auth.totp_enrolled",
        "auth.mfa_challenge",
        "auth.login",
        "auth.recovery_code_used",
    ):
        assert event in events
    assert {line.get("user_id") for line in logs if line["event"] == "auth.login"} == {user.user_id}


async def test_login_result_repr_hides_tokens() -> None:
    result = LoginResult(mfa_token="secret-token-value", mfa_expires_in_us=1)
    assert "secret-token-value" not in repr(result)


# --- recovery codes and usernames, pure ------------------------------------------------------------------------


def test_recovery_codes_have_80_bits_in_crockford_base32() -> None:
    codes = recovery.generate_codes(os.urandom)
    assert len(codes) == 10 and len(set(codes)) == 10
    for code in codes:
        groups = code.split("-")
        assert [len(g) for g in groups] == [4, 4, 4, 4]
        assert set("".join(groups)) <= set("0123456789abcdefghjkmnpqrstvwxyz")
    # all 80 bits land in the code: the all-zero and all-one inputs are the two ends of the alphabet
    assert recovery.generate_codes(lambda n: b"\x00" * n, count=1) == ["0000-0000-0000-0000"]
    assert recovery.generate_codes(lambda n: b"\xff" * n, count=1) == ["zzzz-zzzz-zzzz-zzzz"]
    digest = recovery.hash_code("zzzz-zzzz-zzzz-zzzz")
    assert digest == hashlib.sha256(b"zzzzzzzzzzzzzzzz").hexdigest()


def test_recovery_codes_are_read_forgivingly() -> None:
    assert recovery.normalize_code("AB1C-DE0F-GH1J-KMNP") == "ab1cde0fgh1jkmnp"
    assert recovery.normalize_code("abic delo ghlj kmnp") == "ab1cde10gh1jkmnp"  # i, l → 1; o → 0
    assert recovery.normalize_code("abcd-efgh-jkmn-pqru") is None  # u is not in the alphabet
    assert recovery.normalize_code("abcd-efgh-jkmn") is None
    assert recovery.normalize_code("a" * 100) is None
    with pytest.raises(ValueError):
        recovery.stored_hash("not a code")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_recovery_code_parsing_never_crashes(text: str) -> None:
    normalized = recovery.normalize_code(text)
    if normalized is not None:
        assert len(normalized) == 16 and normalized.isascii()
        assert recovery.normalize_code(normalized) == normalized
        assert recovery.hash_code(text) == hashlib.sha256(normalized.encode()).hexdigest()
    else:
        assert recovery.hash_code(text) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_username_normalisation_never_crashes(text: str) -> None:
    name = normalize_username(text)
    if name is not None:
        assert 3 <= len(name) <= 64 and name.isascii()
        assert normalize_username(name) == name

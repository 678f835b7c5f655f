"""The AuthStore contract (services/auth/store.py), run against real SQLite and real PostgreSQL (the `auth_db`
fixture of conftest.py): every method as its docstring states it — compare-and-swap by version, refresh tokens
spent once, recovery codes used once, all-or-nothing TOTP confirmation — races between many callers and between
two stores on one database (two replicas), restarts, what the rows hold, and the schema's migrations."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar

import pytest
from psycopg import AsyncCursor
from psycopg_pool import PoolClosed

from services.auth import store_postgres, store_sqlite
from services.auth.model import ApiKey, ApiKeyKind, RefreshToken, Role, User
from services.auth.store import SCHEMA_VERSION, AuthStore
from services.auth.store_postgres import PostgresAuthStore
from services.auth.store_sqlite import SqliteAuthStore
from tests.support import PG_DSN
from tradeguard.storage.migrations import SchemaTooNew, latest_version

from .conftest import AuthDatabase

T = TypeVar("T")
T0 = 1_700_000_000_000_000
HOUR = 3600 * 1_000_000


def user(user_id: str = "u-1", username: str = "alice", **overrides: Any) -> User:
    fields: dict[str, Any] = {
        "user_id": user_id,
        "username": username,
        "account_id": "acct-1",
        "roles": ("trader", "viewer"),
        "password_hash": "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA",
        "create_time_us": T0,
    }
    fields.update(overrides)
    return User(**fields)


def api_key(key_id: str = "tgk_1", user_id: str = "u-1", **overrides: Any) -> ApiKey:
    fields: dict[str, Any] = {
        "key_id": key_id,
        "user_id": user_id,
        "account_id": "acct-1",
        "kind": ApiKeyKind.HMAC,
        "scopes": frozenset({"orders:read", "orders:write"}),
        "ip_allow_list": ("10.0.0.0/8", "2001:db8::/32"),
        "tier": "pro",
        "create_time_us": T0,
        "expire_time_us": T0 + 90 * 24 * HOUR,
        "secret": "tgv1:credentials:v1:c2VhbGVk",
        "label": "bot",
    }
    fields.update(overrides)
    return ApiKey(**fields)


def refresh(
    token_hash: str = "aa" * 32, family_id: str = "fam-1", user_id: str = "u-1", **overrides: Any
) -> RefreshToken:
    fields: dict[str, Any] = {
        "token_hash": token_hash,
        "family_id": family_id,
        "user_id": user_id,
        "issue_time_us": T0,
        "expire_time_us": T0 + 24 * HOUR,
        "amr": ("pwd", "otp"),
    }
    fields.update(overrides)
    return RefreshToken(**fields)


async def race(n: int, call: Callable[[], Awaitable[T]]) -> list[T]:
    return list(await asyncio.gather(*(call() for _ in range(n))))


# --- users ---------------------------------------------------------------------------------------------------


async def test_users_round_trip_by_id_and_by_name(auth_store: AuthStore) -> None:
    alice = user(totp_seed="tgv1:credentials:v1:seed", totp_pending_seed="tgv1:credentials:v1:pending")
    assert await auth_store.insert_user(alice)
    assert await auth_store.get_user("u-1") == alice
    assert await auth_store.get_user_by_name("alice") == alice
    assert await auth_store.get_user("u-2") is None
    assert await auth_store.get_user_by_name("bob") is None
    plain = user("u-2", "Alice", roles=())  # usernames compare case-sensitively (NFKC is the core's job)
    assert await auth_store.insert_user(plain)
    assert await auth_store.get_user_by_name("Alice") == plain
    assert await auth_store.get_user_by_name("ALICE") is None


async def test_insert_user_refuses_a_taken_id_or_name_and_writes_nothing(
    auth_db: AuthDatabase, auth_store: AuthStore
) -> None:
    assert await auth_store.insert_user(user())
    assert not await auth_store.insert_user(user("u-1", "other"))
    assert not await auth_store.insert_user(user("u-9", "alice", account_id="acct-9"))
    assert auth_db.count("users") == 1
    assert await auth_store.get_user("u-9") is None
    assert await auth_store.get_user_by_name("other") is None


async def test_update_user_is_a_compare_and_swap(auth_store: AuthStore) -> None:
    await auth_store.insert_user(user())
    changed = user(roles=("admin",), password_hash="$argon2id$new", totp_pending_seed="tgv1:p", version=2)
    assert await auth_store.update_user(changed, expected_version=1)
    assert await auth_store.get_user("u-1") == changed
    stale = user(password_hash="$argon2id$stale", version=2)
    assert not await auth_store.update_user(stale, expected_version=1)  # the version moved on
    assert await auth_store.get_user("u-1") == changed
    assert not await auth_store.update_user(user("u-404", version=2), expected_version=1)
    # Only roles, the password hash and the TOTP fields change: never the name, the account or the id.
    renamed = dataclasses.replace(
        changed, username="mallory", account_id="acct-x", create_time_us=1, version=3
    )
    assert await auth_store.update_user(renamed, expected_version=2)
    stored = await auth_store.get_user("u-1")
    assert stored is not None
    assert (stored.username, stored.account_id, stored.create_time_us, stored.version) == (
        "alice",
        "acct-1",
        T0,
        3,
    )
    assert await auth_store.get_user_by_name("mallory") is None


async def test_a_cas_must_write_the_next_version(auth_store: AuthStore) -> None:
    await auth_store.insert_user(user())
    await auth_store.insert_api_key(api_key())
    for version in (1, 3):
        with pytest.raises(ValueError, match="version must be 2"):
            await auth_store.update_user(user(version=version), expected_version=1)
        with pytest.raises(ValueError, match="version must be 2"):
            await auth_store.confirm_totp(user(version=version), expected_version=1, recovery_code_hashes=[])
        with pytest.raises(ValueError, match="version must be 2"):
            await auth_store.update_api_key(api_key(version=version), expected_version=1)
    assert await auth_store.get_user("u-1") == user()
    assert await auth_store.get_api_key("tgk_1") == api_key()


async def test_concurrent_updates_through_two_stores_have_exactly_one_winner(auth_db: AuthDatabase) -> None:
    first, second = await auth_db.open(), await auth_db.open()
    await first.insert_user(user())
    attempts = [
        (store, user(password_hash=f"$argon2id${i}", version=2))
        for i in range(10)
        for store in (first, second)
    ]
    results = await asyncio.gather(*(store.update_user(u, expected_version=1) for store, u in attempts))
    assert results.count(True) == 1
    winner = attempts[results.index(True)][1]
    assert await second.get_user("u-1") == winner
    assert await first.get_user("u-1") == winner


# --- TOTP confirmation and recovery codes ----------------------------------------------------------------------


async def test_confirm_totp_moves_the_seed_and_replaces_the_codes_in_one_transaction(
    auth_db: AuthDatabase, auth_store: AuthStore
) -> None:
    await auth_store.insert_user(user(totp_pending_seed="tgv1:pending"))
    confirmed = user(totp_seed="tgv1:pending", totp_pending_seed=None, version=2)
    assert await auth_store.confirm_totp(confirmed, 1, ["h1", "h2", "h3"])
    assert await auth_store.get_user("u-1") == confirmed
    assert await auth_store.unused_recovery_codes("u-1") == 3
    assert await auth_store.use_recovery_code("u-1", "h1", T0)
    # A stale confirmation writes nothing: neither the user nor the codes.
    assert not await auth_store.confirm_totp(user(totp_seed="tgv1:other", version=2), 1, ["x1", "x2"])
    assert await auth_store.get_user("u-1") == confirmed
    assert await auth_store.unused_recovery_codes("u-1") == 2
    assert not await auth_store.use_recovery_code("u-1", "x1", T0)
    # A new confirmation (re-enrolment) replaces every code, used ones included; duplicates count once.
    again = dataclasses.replace(confirmed, totp_seed="tgv1:new", version=3)
    assert await auth_store.confirm_totp(again, 2, ["n1", "n2", "n2"])
    assert await auth_store.unused_recovery_codes("u-1") == 2
    assert auth_db.count("recovery_codes") == 2
    assert not await auth_store.use_recovery_code("u-1", "h2", T0)  # the old codes are gone
    assert await auth_store.use_recovery_code("u-1", "n2", T0)


async def test_a_recovery_code_is_used_once_by_exactly_one_caller(auth_db: AuthDatabase) -> None:
    first, second = await auth_db.open(), await auth_db.open()
    await first.insert_user(user())
    await first.insert_user(user("u-2", "bob"))
    assert await first.confirm_totp(user(totp_seed="s", version=2), 1, ["code-a", "code-b"])
    assert await first.confirm_totp(user("u-2", "bob", totp_seed="s", version=2), 1, ["code-a"])
    assert not await first.use_recovery_code("u-1", "unknown", T0)
    stores = [first, second] * 10
    results = await asyncio.gather(
        *(s.use_recovery_code("u-1", "code-a", T0 + i) for i, s in enumerate(stores))
    )
    assert results.count(True) == 1
    assert not await first.use_recovery_code("u-1", "code-a", T0 + 99)
    assert await first.unused_recovery_codes("u-1") == 1
    assert await second.unused_recovery_codes("u-2") == 1  # another user's code of the same hash is its own
    assert await second.use_recovery_code("u-2", "code-a", T0)
    assert await second.unused_recovery_codes("u-2") == 0
    assert await second.unused_recovery_codes("u-404") == 0


# --- roles ---------------------------------------------------------------------------------------------------


async def test_roles_are_created_replaced_and_listed(auth_store: AuthStore) -> None:
    assert await auth_store.list_roles() == []
    await auth_store.put_role(Role("trader", frozenset({"orders:read", "orders:write"})))
    await auth_store.put_role(Role("admin", frozenset({"users:manage", "keys:manage"})))
    await auth_store.put_role(Role("viewer", frozenset()))
    await auth_store.put_role(Role("trader", frozenset({"orders:read"})))  # replaced
    assert await auth_store.list_roles() == [
        Role("admin", frozenset({"users:manage", "keys:manage"})),
        Role("trader", frozenset({"orders:read"})),
        Role("viewer", frozenset()),
    ]


# --- API keys ------------------------------------------------------------------------------------------------


async def test_api_keys_round_trip_for_both_kinds(auth_db: AuthDatabase, auth_store: AuthStore) -> None:
    hmac_key = api_key()
    ed_key = api_key(
        "tgk_2",
        kind=ApiKeyKind.ED25519,
        secret=None,
        public_key=bytes(range(32)),
        ip_allow_list=(),
        scopes=frozenset(),
        create_time_us=T0 + 1,
    )
    other = api_key("tgk_3", user_id="u-2")
    for key in (ed_key, hmac_key, other):
        assert await auth_store.insert_api_key(key)
    assert not await auth_store.insert_api_key(api_key(label="again"))  # the key id exists
    assert auth_db.count("api_keys") == 3
    assert await auth_store.get_api_key("tgk_1") == hmac_key
    assert await auth_store.get_api_key("tgk_2") == ed_key
    assert await auth_store.get_api_key("tgk_404") is None
    assert await auth_store.list_api_keys("u-1") == [hmac_key, ed_key]  # by creation time
    assert await auth_store.list_api_keys("u-404") == []


async def test_update_api_key_is_a_compare_and_swap_of_its_secret_scopes_revocation_and_expiry(
    auth_store: AuthStore,
) -> None:
    await auth_store.insert_api_key(api_key())
    rotated = api_key(
        secret="tgv1:credentials:v1:new",
        previous_secret="tgv1:credentials:v1:c2VhbGVk",
        previous_expire_time_us=T0 + HOUR,
        scopes=frozenset({"orders:read"}),
        expire_time_us=T0 + 2 * HOUR,
        version=2,
    )
    assert await auth_store.update_api_key(rotated, expected_version=1)
    assert await auth_store.get_api_key("tgk_1") == rotated
    assert not await auth_store.update_api_key(api_key(revoke_time_us=T0, version=2), expected_version=1)
    revoked = dataclasses.replace(rotated, revoke_time_us=T0 + 5, previous_secret=None, version=3)
    assert await auth_store.update_api_key(revoked, expected_version=2)
    assert await auth_store.get_api_key("tgk_1") == revoked
    # The owner, kind, tier, allow-list and label are not among what an update replaces.
    moved = dataclasses.replace(
        revoked, user_id="u-9", tier="free", ip_allow_list=(), label="x", kind=ApiKeyKind.ED25519, version=4
    )
    assert await auth_store.update_api_key(moved, expected_version=3)
    assert await auth_store.get_api_key("tgk_1") == dataclasses.replace(revoked, version=4)
    ed = api_key("tgk_2", kind=ApiKeyKind.ED25519, secret=None, public_key=b"\x01" * 32)
    await auth_store.insert_api_key(ed)
    ed_rotated = dataclasses.replace(ed, public_key=b"\x02" * 32, previous_public_key=b"\x01" * 32, version=2)
    assert await auth_store.update_api_key(ed_rotated, expected_version=1)
    assert await auth_store.get_api_key("tgk_2") == ed_rotated
    assert not await auth_store.update_api_key(api_key("tgk_404", version=2), expected_version=1)


async def test_concurrent_key_updates_through_two_stores_have_exactly_one_winner(
    auth_db: AuthDatabase,
) -> None:
    first, second = await auth_db.open(), await auth_db.open()
    await first.insert_api_key(api_key())
    attempts = [(s, api_key(revoke_time_us=T0 + i, version=2)) for i in range(10) for s in (first, second)]
    results = await asyncio.gather(*(s.update_api_key(k, expected_version=1) for s, k in attempts))
    assert results.count(True) == 1
    assert await second.get_api_key("tgk_1") == attempts[results.index(True)][1]


# --- refresh tokens ------------------------------------------------------------------------------------------


async def test_a_refresh_token_is_spent_once_and_every_later_use_is_a_reuse(auth_store: AuthStore) -> None:
    token = refresh(cnf_thumbprint="x5t-thumbprint")
    await auth_store.insert_refresh_token(token)
    with pytest.raises(ValueError, match="already stored"):
        await auth_store.insert_refresh_token(refresh(family_id="fam-other"))
    spent, first = await auth_store.use_refresh_token(token.token_hash, T0 + 10)
    assert first and spent == dataclasses.replace(token, used_time_us=T0 + 10)
    again, second = await auth_store.use_refresh_token(token.token_hash, T0 + 20)
    assert not second and again == spent  # the record as the first use left it: a reuse
    assert await auth_store.use_refresh_token("bb" * 32, T0) == (None, False)


async def test_concurrent_refreshes_through_two_stores_spend_the_token_exactly_once(
    auth_db: AuthDatabase,
) -> None:
    first, second = await auth_db.open(), await auth_db.open()
    await first.insert_refresh_token(refresh())
    stores = [first, second] * 15
    results = await asyncio.gather(*(s.use_refresh_token("aa" * 32, T0 + i) for i, s in enumerate(stores)))
    assert [spent for _, spent in results].count(True) == 1
    winner = next(token for token, spent in results if spent)
    assert winner is not None and winner.used_time_us is not None
    # Every loser saw the token (a reuse), never None.
    assert all(token is not None and token.token_hash == "aa" * 32 for token, _ in results)


async def test_a_revoked_token_is_never_spent(auth_store: AuthStore) -> None:
    await auth_store.insert_refresh_token(refresh("aa" * 32, "fam-1"))
    await auth_store.insert_refresh_token(refresh("ab" * 32, "fam-1", used_time_us=T0 + 1))
    await auth_store.insert_refresh_token(refresh("cc" * 32, "fam-2"))
    await auth_store.revoke_family("fam-1", T0 + 100)
    await auth_store.revoke_family("fam-1", T0 + 200)  # idempotent: the first revocation time stays
    token, spent = await auth_store.use_refresh_token("aa" * 32, T0 + 300)
    assert not spent and token == refresh("aa" * 32, "fam-1", revoke_time_us=T0 + 100)
    used, _ = await auth_store.use_refresh_token("ab" * 32, T0 + 300)
    assert used is not None and used.revoke_time_us == T0 + 100 and used.used_time_us == T0 + 1
    other, other_spent = await auth_store.use_refresh_token("cc" * 32, T0 + 300)
    assert other_spent and other is not None and other.revoke_time_us is None
    await auth_store.revoke_family("fam-404", T0)  # nothing to revoke: no error


async def test_revoke_user_families_revokes_everything_of_the_user_and_names_the_live_families(
    auth_store: AuthStore,
) -> None:
    now = T0 + HOUR
    for token in (
        refresh("01" * 32, "fam-live"),  # unused, unexpired: live
        refresh("02" * 32, "fam-live", used_time_us=T0 + 1),
        refresh("03" * 32, "fam-spent", used_time_us=T0 + 1),  # only a used token: not live
        refresh("04" * 32, "fam-expired", expire_time_us=now - 1),  # expired: not live
        refresh("05" * 32, "fam-revoked", revoke_time_us=T0),  # already revoked: not live
        refresh("06" * 32, "fam-second"),
        refresh("07" * 32, "fam-bob", user_id="u-2"),
    ):
        await auth_store.insert_refresh_token(token)
    assert await auth_store.revoke_user_families("u-1", now) == ["fam-live", "fam-second"]
    for token_hash in ("01", "02", "03", "04", "06"):
        found, spent = await auth_store.use_refresh_token(token_hash * 32, now + 1)
        assert not spent and found is not None and found.revoke_time_us == now
    revoked_before, _ = await auth_store.use_refresh_token("05" * 32, now + 1)
    assert revoked_before is not None and revoked_before.revoke_time_us == T0  # kept
    assert await auth_store.revoke_user_families("u-1", now + 5) == []  # nothing live any more
    bob, bob_spent = await auth_store.use_refresh_token("07" * 32, now + 1)
    assert bob_spent and bob is not None and bob.revoke_time_us is None


# --- restarts, closing, what the rows hold ----------------------------------------------------------------------


async def test_a_restart_keeps_everything(auth_db: AuthDatabase, auth_store: AuthStore) -> None:
    await auth_store.insert_user(user())
    await auth_store.confirm_totp(user(totp_seed="s", version=2), 1, ["h"])
    await auth_store.put_role(Role("trader", frozenset({"orders:write"})))
    await auth_store.insert_api_key(api_key())
    await auth_store.insert_refresh_token(refresh())
    await auth_store.close()
    reopened = await auth_db.open()
    assert await reopened.get_user_by_name("alice") == user(totp_seed="s", version=2)
    assert await reopened.unused_recovery_codes("u-1") == 1
    assert await reopened.list_roles() == [Role("trader", frozenset({"orders:write"}))]
    assert await reopened.get_api_key("tgk_1") == api_key()
    assert (await reopened.use_refresh_token("aa" * 32, T0))[1]


async def test_a_closed_store_refuses_work(auth_store: AuthStore) -> None:
    await auth_store.close()
    with pytest.raises((RuntimeError, PoolClosed), match="closed"):  # each backend's own "closed" error
        await auth_store.get_api_key("tgk_1")
    with pytest.raises((RuntimeError, PoolClosed), match="closed"):
        await auth_store.insert_user(user())


def _columns(auth_db: AuthDatabase, table: str) -> list[str]:
    if auth_db.kind == "sqlite":
        return [str(row[1]) for row in auth_db.execute(f"PRAGMA table_info({table})")]
    rows = auth_db.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
        "ORDER BY ordinal_position",
        (auth_db.schema, table),
    )
    return [str(row[0]) for row in rows]


async def test_the_rows_hold_what_the_model_holds_and_nothing_else(
    auth_db: AuthDatabase, auth_store: AuthStore
) -> None:
    """Hashes, ciphertexts and public keys only: each table's columns are its model's fields, no more."""
    fields = {
        "users": User,
        "api_keys": ApiKey,
        "refresh_tokens": RefreshToken,
        "roles": Role,
    }
    for table, model in fields.items():
        assert sorted(_columns(auth_db, table)) == sorted(f.name for f in dataclasses.fields(model)), table
    assert sorted(_columns(auth_db, "recovery_codes")) == ["code_hash", "used_time_us", "user_id"]
    # And a written key's row holds the ciphertext it was given, nothing derived from a secret.
    await auth_store.insert_api_key(api_key())
    row = auth_db.execute("SELECT secret, public_key FROM {schema}.api_keys WHERE key_id = %s", ("tgk_1",))
    assert row == [("tgv1:credentials:v1:c2VhbGVk", None)]


async def test_the_lookups_use_indexes(auth_db: AuthDatabase, auth_store: AuthStore) -> None:
    """Every lookup is by primary key or an index (the query plan says so), never a scan of a table."""
    lookups = {
        "get_user": ("u-1",),
        "get_user_by_name": ("alice",),
        "get_key": ("tgk_1",),
        "list_keys": ("u-1",),
        "get_refresh": ("aa" * 32,),
        "revoke_family": (T0, "fam-1"),
        "revoke_user": (T0, "u-1"),
        "use_code": (T0, "u-1", "h"),
        "unused_codes": ("u-1",),
    }
    if isinstance(auth_store, SqliteAuthStore):
        for name, params in lookups.items():
            text = store_sqlite.SQL[name]
            plan = " ".join(str(row[-1]) for row in auth_db.execute(f"EXPLAIN QUERY PLAN {text}", params))
            assert "SEARCH" in plan and "SCAN" not in plan, (name, plan)
        return
    assert isinstance(auth_store, PostgresAuthStore)
    async with auth_store._pool.connection() as conn:
        await conn.execute("SET enable_seqscan = off")  # tiny tables: make the planner show what it could use
        try:
            for name, params in lookups.items():
                async with conn.transaction(force_rollback=True):
                    cur = await conn.execute(b"EXPLAIN " + auth_store.sql[name].as_bytes(conn), params)
                    plan = " ".join(str(row[0]) for row in await cur.fetchall())
                assert "Index" in plan and "Seq Scan" not in plan, (name, plan)
        finally:
            await conn.execute("RESET enable_seqscan")


async def test_the_hot_paths_are_one_statement(auth_db: AuthDatabase, auth_store: AuthStore) -> None:
    await auth_store.insert_user(user())
    await auth_store.insert_api_key(api_key())
    if isinstance(auth_store, SqliteAuthStore):
        seen: list[str] = []

        def trace(conn: sqlite3.Connection) -> None:
            conn.set_trace_callback(seen.append)

        await auth_store.worker.run(trace)
        assert await auth_store.get_api_key("tgk_1") == api_key()
        assert await auth_store.get_user_by_name("alice") == user()
        await auth_store.worker.run(lambda conn: conn.set_trace_callback(None))
        assert len(seen) == 2 and all(s.startswith("SELECT") for s in seen), seen
        return
    # PostgreSQL: a store with one pooled connection whose cursors record every statement they execute.
    assert isinstance(auth_store, PostgresAuthStore)
    executed: list[object] = []

    class Recording(AsyncCursor[tuple[Any, ...]]):
        async def execute(self, query: Any, params: Any = None, **options: Any) -> Self:
            executed.append(query)
            return await super().execute(query, params, **options)

    single = await PostgresAuthStore.open(PG_DSN, schema=auth_db.schema, min_size=1, max_size=1)
    try:
        async with single._pool.connection() as conn:
            conn.cursor_factory = Recording
        assert await single.get_api_key("tgk_1") == api_key()
        assert await single.get_user_by_name("alice") == user()
        assert executed == [single.sql["get_key"], single.sql["get_user_by_name"]]
    finally:
        await single.close()


# --- the schema: migrations ------------------------------------------------------------------------------------


def test_both_backends_migrate_to_the_schema_version() -> None:
    assert (
        latest_version(store_sqlite.MIGRATIONS) == latest_version(store_postgres.MIGRATIONS) == SCHEMA_VERSION
    )


def test_postgres_defaults_to_its_own_schema() -> None:
    assert store_postgres.DEFAULT_SCHEMA == "tg_auth"


async def test_a_reopened_database_is_kept_at_its_version(auth_db: AuthDatabase) -> None:
    store = await auth_db.open()
    await store.insert_user(user())
    await store.close()
    reopened = await auth_db.open()
    assert await reopened.get_user("u-1") == user()
    assert auth_db.execute("SELECT version FROM {schema}.schema_version") == [(SCHEMA_VERSION,)]


async def test_a_newer_schema_is_refused(auth_db: AuthDatabase) -> None:
    await (await auth_db.open()).close()
    auth_db.execute("INSERT INTO {schema}.schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match="newer than this code"):
        await auth_db.open()

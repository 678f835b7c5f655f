"""The VaultStore contract (services/keyvault/store.py), run against real SQLite and real PostgreSQL (the `backend`
fixture of conftest.py): every method as its docstring states it, the compare-and-swap rules, the fence,
all-or-nothing re-wrapping, restarts, races between two stores on one database, and the schema's migrations."""

from __future__ import annotations

import asyncio

import pytest
from psycopg_pool import PoolClosed

from services.keyvault import store_postgres, store_sqlite
from services.keyvault.model import KeyConfig, KeyType, VersionRecord
from services.keyvault.store import SCHEMA_VERSION, RootChanged, SecretRecord, VaultStore
from tradeguard.storage.migrations import SchemaTooNew, latest_version

from .conftest import Backend

T0 = 1_700_000_000_000_000


def config(name: str = "k", update_us: int = T0, **overrides: object) -> KeyConfig:
    fields: dict[str, object] = {
        "name": name,
        "type": KeyType.AES256_GCM,
        "min_decryption_version": 1,
        "auto_rotate_period_us": 0,
        "deletion_allowed": False,
        "create_us": T0,
        "update_us": update_us,
    }
    fields.update(overrides)
    return KeyConfig(**fields)  # type: ignore[arg-type]


def version(n: int, at: int = T0) -> VersionRecord:
    return VersionRecord(version=n, wrapped=f"wrapped-{n}".encode(), public_key=b"", create_us=at)


def secret(version_: int, path: str = "db/password", owner: str = "trading") -> SecretRecord:
    return SecretRecord(
        owner=owner,
        path=path,
        version=version_,
        wrapped_data_key=f"dk-{version_}".encode(),
        ciphertext=f"ct-{version_}".encode(),
        create_us=T0 + version_,
    )


@pytest.fixture
async def store(backend: Backend) -> VaultStore:
    return await backend.open()


async def test_meta_is_written_once(store: VaultStore) -> None:
    assert await store.get_meta("root_check") is None
    assert await store.put_meta_if_absent("root_check", b"first") == b"first"
    assert await store.put_meta_if_absent("root_check", b"second") == b"first"  # the value now stored
    assert await store.get_meta("root_check") == b"first"


async def test_create_get_list_keys(store: VaultStore) -> None:
    assert await store.create_key(config("b"), version(1))
    assert not await store.create_key(config("b", deletion_allowed=True), version(1))  # exists: no change
    for name in ("a", "c", "d"):
        assert await store.create_key(config(name), version(1))
    key = await store.get_key("b")
    assert key is not None and key.config == config("b") and key.versions == (version(1),)
    assert await store.get_key("missing") is None
    assert [k.config.name for k in await store.list_keys("", 2)] == ["a", "b"]
    assert [k.config.name for k in await store.list_keys("b", 10)] == ["c", "d"]
    assert await store.list_keys("d", 10) == []
    assert await store.key_stamp("b") == (T0, T0)
    assert await store.key_stamp("missing") is None


async def test_add_version_is_a_compare_and_swap(store: VaultStore) -> None:
    await store.create_key(config(), version(1))
    stamp = await store.add_version("k", version(2, T0 + 5), T0 + 5, T0)
    assert stamp == T0 + 5
    assert await store.add_version("k", version(3), T0 + 9, T0) is None  # update_us changed since it was read
    assert await store.add_version("k", version(4), T0 + 9, stamp) is None  # not the next version
    assert await store.add_version("gone", version(2), T0 + 9, T0) is None  # no such key
    # update_us only grows, even when the caller's clock went back.
    again = await store.add_version("k", version(3, T0 + 6), T0 + 1, stamp)
    assert again == T0 + 6
    key = await store.get_key("k")
    assert key is not None and [v.version for v in key.versions] == [1, 2, 3]
    assert key.config.update_us == again


async def test_concurrent_rotations_through_two_stores_add_exactly_one_version(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    await first.create_key(config(), version(1))
    results = await asyncio.gather(
        *(s.add_version("k", version(2), T0 + 10 + i, T0) for i, s in enumerate([first, second] * 5))
    )
    assert sum(result is not None for result in results) == 1
    key = await second.get_key("k")
    assert key is not None and [v.version for v in key.versions] == [1, 2]


async def test_update_config_is_a_compare_and_swap(store: VaultStore) -> None:
    await store.create_key(config(), version(1))
    changed = config(min_decryption_version=2, deletion_allowed=True, update_us=T0 + 3)
    stamp = await store.update_config(changed, T0)
    assert stamp == T0 + 3
    assert await store.update_config(config(update_us=T0 + 4), T0) is None  # stale: no change
    key = await store.get_key("k")
    assert key is not None and key.config.min_decryption_version == 2 and key.config.deletion_allowed
    assert await store.update_config(config("gone"), T0) is None


async def test_delete_key_and_usage_counts(store: VaultStore) -> None:
    await store.create_key(config(), version(1))
    assert await store.add_encryptions("k", 1, 5) == 5
    assert await store.add_encryptions("k", 1, 7) == 12
    assert await store.add_encryptions("k", 2, 1) == 1  # per version
    assert await store.delete_key("k")
    assert not await store.delete_key("k")
    assert await store.get_key("k") is None
    assert await store.add_encryptions("k", 1, 1) == 1  # the old count went with the key


async def test_secret_versions(store: VaultStore) -> None:
    assert await store.insert_secret_version(secret(1))
    assert not await store.insert_secret_version(secret(1))  # (owner, path, version) exists
    assert await store.insert_secret_version(secret(2))
    assert await store.insert_secret_version(
        secret(1, owner="auth")
    )  # another owner's path is another secret
    assert await store.get_secret_version("trading", "db/password", None) == secret(2)  # newest
    assert await store.get_secret_version("trading", "db/password", 1) == secret(1)
    assert await store.get_secret_version("trading", "db/password", 3) is None
    listed = await store.list_secret_versions("trading", "db/password")
    assert [(r.version, r.wrapped_data_key, r.ciphertext) for r in listed] == [
        (1, None, None),
        (2, None, None),
    ]
    assert await store.destroy_secret_version("trading", "db/password", 1, T0 + 50)
    destroyed = await store.get_secret_version("trading", "db/password", 1)
    assert destroyed is not None and destroyed.destroyed and destroyed.destroy_us == T0 + 50
    assert destroyed.wrapped_data_key is None
    assert await store.destroy_secret_version("trading", "db/password", 1, T0 + 99)  # again: time kept
    again = await store.get_secret_version("trading", "db/password", 1)
    assert again is not None and again.destroy_us == T0 + 50
    assert not await store.destroy_secret_version("trading", "db/password", 9, T0)


async def test_the_fence_stops_every_write_of_wrapped_material(backend: Backend, store: VaultStore) -> None:
    await store.put_meta_if_absent("root_check", b"root-A")
    await store.create_key(config(), version(1))
    store.fence("root_check", b"root-A")
    assert await store.create_key(config("fenced-ok"), version(1))  # the check holds: writes go on
    other = await backend.open()  # another replica moves the ring to root B
    await other.rewrap_all(
        "root_check", b"root-A", b"root-B", lambda n, v, w: w + b"+B", lambda o, p, v, w: w
    )
    with pytest.raises(RootChanged):
        await store.create_key(config("new"), version(1))
    with pytest.raises(RootChanged):
        await store.add_version("k", version(2), T0 + 1, T0)
    with pytest.raises(RootChanged):
        await store.insert_secret_version(secret(1))
    assert await store.get_key("new") is None
    key = await store.get_key("k")
    assert key is not None and len(key.versions) == 1
    assert await store.get_secret_version("trading", "db/password", None) is None


async def test_rewrap_all_is_all_or_nothing(store: VaultStore) -> None:
    await store.put_meta_if_absent("root_check", b"old")
    for name in ("a", "b"):
        await store.create_key(config(name), version(1))
    await store.insert_secret_version(secret(1))
    await store.insert_secret_version(secret(2))
    await store.destroy_secret_version("trading", "db/password", 1, T0)  # no data key left to rewrap

    with pytest.raises(RootChanged):
        await store.rewrap_all("root_check", b"not-old", b"new", lambda n, v, w: w, lambda o, p, v, w: w)

    def failing(name: str, version_: int, wrapped: bytes) -> bytes:
        if name == "b":
            raise RuntimeError("the HSM went away")
        return b"new:" + wrapped

    with pytest.raises(RuntimeError, match="HSM"):
        await store.rewrap_all("root_check", b"old", b"new", failing, lambda o, p, v, w: b"new:" + w)
    key_a = await store.get_key("a")
    assert key_a is not None and key_a.versions[0].wrapped == b"wrapped-1"  # rolled back with b's failure
    assert await store.get_meta("root_check") == b"old"

    counts = await store.rewrap_all(
        "root_check", b"old", b"new", lambda n, v, w: b"new:" + w, lambda o, p, v, w: b"new:" + w
    )
    assert counts == (2, 1)
    assert await store.get_meta("root_check") == b"new"
    key_b = await store.get_key("b")
    assert key_b is not None and key_b.versions[0].wrapped == b"new:wrapped-1"
    live = await store.get_secret_version("trading", "db/password", 2)
    assert live is not None and live.wrapped_data_key == b"new:dk-2" and live.ciphertext == b"ct-2"


async def test_restart_keeps_everything(backend: Backend, store: VaultStore) -> None:
    await store.put_meta_if_absent("root_check", b"r")
    await store.create_key(config(), version(1))
    await store.insert_secret_version(secret(1))
    await store.close()
    reopened = await backend.open()
    assert await reopened.get_meta("root_check") == b"r"
    key = await reopened.get_key("k")
    assert key is not None and key.versions == (version(1),)
    assert await reopened.get_secret_version("trading", "db/password", 1) == secret(1)


async def test_a_closed_store_refuses_work(store: VaultStore) -> None:
    await store.close()
    with pytest.raises((RuntimeError, PoolClosed), match="closed"):  # each backend's own "closed" error
        await store.get_meta("root_check")


# --- the schema: migrations ------------------------------------------------------------------------------


def test_both_backends_migrate_to_the_schema_version() -> None:
    assert (
        latest_version(store_sqlite.MIGRATIONS) == latest_version(store_postgres.MIGRATIONS) == SCHEMA_VERSION
    )


async def test_a_database_written_before_migrations_is_kept(backend: Backend) -> None:
    """Today's v1 databases recorded `schema_version` 1: they are recognised, not recreated, and their data kept."""
    store = await backend.open()
    await store.create_key(config(), version(1))
    await store.close()
    assert backend.execute("SELECT version FROM {schema}.schema_version") == [(1,)]
    reopened = await backend.open()
    key = await reopened.get_key("k")
    assert key is not None and key.versions == (version(1),)
    assert backend.execute("SELECT version FROM {schema}.schema_version") == [(1,)]


async def test_a_newer_schema_is_refused(backend: Backend) -> None:
    await (await backend.open()).close()
    backend.execute("INSERT INTO {schema}.schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match="newer than this code"):
        await backend.open()

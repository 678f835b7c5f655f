"""Real stores (SQLite in tmp_path, PostgreSQL in a fresh schema per test), a fake clock, a sealed local root,
and a SoftHSM2 token of the test's own (in tmp_path, never the system token directory)."""

from __future__ import annotations

import inspect
import os
import secrets
import shutil
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from services.keyvault.core import KeyVault
from services.keyvault.errors import Code, DecryptionFailed
from services.keyvault.key_cache import DEFAULT_KEY_FRESHNESS_US
from services.keyvault.keyring import parse_token
from services.keyvault.model import KeyType
from services.keyvault.policy import DEFAULT_POLICY, Policy
from services.keyvault.root import LocalSealedRoot, RootKey
from services.keyvault.store import VaultStore
from services.keyvault.store_postgres import PostgresVaultStore
from services.keyvault.store_sqlite import SqliteVaultStore
from tests.support import PG_DSN, Database, open_database
from tradeguard.testing import FakeClock

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PASSPHRASE = "correct horse battery staple"
SCRYPT_N = 2**10  # fast in tests; production uses 2**15
AES = KeyType.AES256_GCM
OPS, AUTH, TRADING = "ops", "auth", "trading"
HOUR_US = 3600 * 1_000_000
FRESHNESS_US = DEFAULT_KEY_FRESHNESS_US  # the vault's default window (0.5 s)


async def decrypt_fails(vault: KeyVault, name: str, ciphertext: str, ad: bytes = b"") -> DecryptionFailed:
    """The decryption fails with the one opaque error, whatever the cause."""
    with pytest.raises(DecryptionFailed) as info:
        await vault.decrypt(AUTH, name, ciphertext, ad)
    error = info.value
    assert error.code is Code.INVALID_ARGUMENT
    assert error.reason == "DECRYPTION_FAILED"
    assert error.message == "decryption failed"
    assert error.metadata == {}
    return error


def version_of(token: str) -> int:
    """The key version a `tgv1:` ciphertext, signature or MAC names (the test fails if it names none)."""
    parsed = parse_token(token)
    assert parsed is not None, token
    return parsed.version


class RecordingRandom:
    """os.urandom that remembers what it handed out (to search the database for key material)."""

    def __init__(self) -> None:
        self.outputs: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        value = os.urandom(n)
        self.outputs.append(value)
        return value


class Backend(Database):
    """The key vault test's database; `open()` may be called again (a restart) and sees the same data."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        super().__init__(kind, tmp_path, "keyvault.db", "tg_kv_test")

    async def open(self) -> VaultStore:
        if self.kind == "sqlite":
            return self.opened(await SqliteVaultStore.open(self.path))
        return self.opened(await PostgresVaultStore.open(PG_DSN, schema=self.schema, min_size=1, max_size=4))

    def raw_bytes(self) -> bytes:
        """Every byte the database holds: the SQLite file with its WAL and shared memory, or a PostgreSQL dump
        of the schema's tables as bytea hex turned back into bytes."""
        if self.kind == "sqlite":
            return b"".join(p.read_bytes() for p in sorted(self.tmp_path.glob("keyvault.db*")) if p.is_file())
        out = []
        with psycopg.connect(PG_DSN, autocommit=True) as pg:
            for table in ("vault_meta", "keys", "key_versions", "secret_versions"):
                cur = pg.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(self.schema, table)))
                for row in cur.fetchall():
                    for value in row:
                        out.append(
                            bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()
                        )
        return b"\x00".join(out)


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with open_database(Backend, request.param, tmp_path) as database:
        yield database


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def random() -> RecordingRandom:
    return RecordingRandom()


class VaultFactory:
    """Builds vaults over the test's backend; each `open()` is a fresh process's view (a restart)."""

    def __init__(self, backend: Backend, clock: FakeClock, random: Callable[[int], bytes]) -> None:
        self.backend = backend
        self.clock = clock
        self.random = random
        self.root_path = backend.tmp_path / "keyvault.root"
        self.vaults: list[KeyVault] = []

    def unsealer(self, passphrase: str) -> RootKey:
        if not self.root_path.exists():
            return LocalSealedRoot.create(self.root_path, passphrase, self.random, scrypt_n=SCRYPT_N)
        return LocalSealedRoot.unseal(self.root_path, passphrase, self.random)

    async def open(
        self,
        *,
        unsealed: bool = True,
        policy: Policy = DEFAULT_POLICY,
        wrap: Callable[[VaultStore], VaultStore] | None = None,
        **options: int,
    ) -> KeyVault:
        """`wrap` puts something around the real store (HookedStore: run a step of another replica mid-call)."""
        store = await self.backend.open()
        if wrap is not None:
            store = wrap(store)
        root = self.unsealer(PASSPHRASE) if unsealed else None
        vault = KeyVault(
            store,
            policy,
            clock=self.clock,
            random=self.random,
            root=root,
            unsealer=self.unsealer,
            **options,  # type: ignore[arg-type]
        )
        await vault.start()
        self.vaults.append(vault)
        return vault


class HookedStore:
    """The real store, with one-shot hooks run right after a named method's real call returns: a deterministic
    interleaving of another replica's (or a local) change into the middle of an operation. No fake data.
    `calls` counts the calls of each method (the store reads an operation costs)."""

    def __init__(self, store: VaultStore) -> None:
        self._store = store
        self.after: dict[str, Callable[[], Awaitable[object]]] = {}
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> object:
        real = getattr(self._store, name)
        if not inspect.iscoroutinefunction(real):  # attributes and plain methods (fence) pass through
            return real

        async def call(*args: object, **kwargs: object) -> object:
            self.calls[name] += 1
            result = await real(*args, **kwargs)
            hook = self.after.pop(name, None)
            if hook is not None:
                await hook()
            return result

        return call


@pytest.fixture
async def vaults(backend: Backend, clock: FakeClock, random: RecordingRandom) -> AsyncIterator[VaultFactory]:
    factory = VaultFactory(backend, clock, random)
    yield factory
    for vault in factory.vaults:
        await vault.close()


@pytest.fixture
async def vault(vaults: VaultFactory) -> KeyVault:
    return await vaults.open()


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A fresh SoftHSM2 token in tmp_path: {module, token, pin}. The library is re-initialised onto it."""
    util = shutil.which("softhsm2-util")
    if util is None or not Path(SOFTHSM_MODULE).exists():
        pytest.skip("SoftHSM2 is not installed (make system-deps)")
    tokens = tmp_path / "softhsm-tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    label, pin = f"tg-{secrets.token_hex(4)}", "1234-" + secrets.token_hex(4)
    subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--so-pin", "so-" + pin, "--pin", pin],
        check=True,
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )
    import pkcs11

    pkcs11.lib(SOFTHSM_MODULE).reinitialize()  # C_Finalize + C_Initialize: read this test's configuration
    yield {"module": SOFTHSM_MODULE, "token": label, "pin": pin}


def wrap_hooked(into: list[HookedStore]) -> Callable[[VaultStore], VaultStore]:
    """A `VaultFactory.open(wrap=...)` that puts a HookedStore around the real store and appends it to `into`."""

    def wrap(store: VaultStore) -> VaultStore:
        into.append(HookedStore(store))
        return into[-1]  # type: ignore[return-value]  # it forwards every VaultStore method

    return wrap

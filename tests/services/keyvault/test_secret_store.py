"""The secret store (secret_store.py): versions, compare-and-swap, destruction, binding to owner and path."""

from __future__ import annotations

import pytest

from services.keyvault.core import KeyVault
from services.keyvault.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.keyvault.root import RootUnwrapError

from .conftest import AUTH, OPS, Backend


async def test_secret_store(vault: KeyVault, backend: Backend) -> None:
    v1 = await vault.put_secret(AUTH, "alice", "auth/totp", b"seed-1")
    assert v1.version == 1
    v2 = await vault.put_secret(AUTH, "alice", "auth/totp", b"seed-2", cas_version=1)
    assert v2.version == 2
    with pytest.raises(FailedPrecondition) as info:
        await vault.put_secret(AUTH, "alice", "auth/totp", b"seed-3", cas_version=1)
    assert info.value.reason == "SECRET_CAS_MISMATCH"
    with pytest.raises(FailedPrecondition):
        await vault.put_secret(AUTH, "alice", "auth/totp", b"seed-3", cas_version=0)
    assert (await vault.put_secret(AUTH, "bob", "auth/totp", b"bob-seed", cas_version=0)).version == 1
    value, info2 = await vault.get_secret(AUTH, "alice", "auth/totp")
    assert value == b"seed-2" and info2.version == 2
    assert (await vault.get_secret(AUTH, "alice", "auth/totp", 1))[0] == b"seed-1"
    await vault.destroy_secret_version(OPS, "alice", "auth/totp", 1)
    with pytest.raises(FailedPrecondition) as destroyed:
        await vault.get_secret(AUTH, "alice", "auth/totp", 1)
    assert destroyed.value.reason == "SECRET_VERSION_DESTROYED"
    versions = await vault.list_secret_versions(OPS, "alice", "auth/totp")
    assert [(v.version, v.destroyed) for v in versions] == [(1, True), (2, False)]
    with pytest.raises(NotFound):
        await vault.get_secret(AUTH, "carol", "auth/totp")
    with pytest.raises(NotFound):
        await vault.destroy_secret_version(OPS, "alice", "auth/totp", 9)
    with pytest.raises(InvalidArgument):
        await vault.put_secret(AUTH, "a:b", "auth/totp", b"x")
    # Owner and path are bound in: bob's sealed value copied over alice's row does not open.
    backend.execute(
        "UPDATE {schema}.secret_versions SET ciphertext = "
        "(SELECT ciphertext FROM {schema}.secret_versions WHERE owner = 'bob'), wrapped_data_key = "
        "(SELECT wrapped_data_key FROM {schema}.secret_versions WHERE owner = 'bob') "
        "WHERE owner = 'alice' AND version = 2"
    )
    with pytest.raises(RootUnwrapError):
        await vault.get_secret(AUTH, "alice", "auth/totp", 2)

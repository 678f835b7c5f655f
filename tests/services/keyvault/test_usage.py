"""Usage counting (usage.py): a version is rotated once it reaches its encryption limit."""

from __future__ import annotations

import io
import json

from tradeguard.observability.logging import configure_logging

from .conftest import AES, AUTH, OPS, VaultFactory, version_of


async def test_a_version_is_rotated_once_it_reaches_its_encryption_limit(vaults: VaultFactory) -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out, level="debug")
    try:
        a = await vaults.open(max_encryptions_per_version=5)
        await a.create_key(OPS, "credentials", AES)
        sealed = [(b"%d" % i, await a.encrypt(AUTH, "credentials", b"%d" % i)) for i in range(5)]
        assert {version_of(ct) for _, ct in sealed} == {1}
        assert (await a.get_key(OPS, "credentials")).latest.version == 2  # the 5th encryption rotated it
        ct = await a.encrypt(AUTH, "credentials", b"v2")
        assert ct.startswith("tgv1:credentials:v2:")
        sealed.append((b"v2", ct))
        # Batches, data keys and rewraps count too.
        batch = await a.batch_encrypt(AUTH, "credentials", [(b"b", b"")] * 3)
        sealed += [(b"b", str(c)) for c in batch]
        await a.rewrap(AUTH, "credentials", ct)
        assert (await a.get_key(OPS, "credentials")).latest.version == 3
        # Two replicas: each one's count stays below the limit; the store adds them up at the rotation check.
        b = await vaults.open(max_encryptions_per_version=5)
        for vault in (a, a, a, b, b, b):
            sealed.append((b"x", await vault.encrypt(AUTH, "credentials", b"x")))
        assert (await a.get_key(OPS, "credentials")).latest.version == 3
        assert await a.rotate_due() == []  # 3 stored
        assert await b.rotate_due() == ["credentials"]  # 6 stored: over the limit
        assert await a.rotate_due() == [] and await b.rotate_due() == []
        assert (await a.get_key(OPS, "credentials")).latest.version == 4
        for plaintext, ciphertext in sealed:
            assert await b.decrypt(AUTH, "credentials", ciphertext) == plaintext
    finally:
        configure_logging(json=True)
    limits = [json.loads(line) for line in out.getvalue().splitlines() if "encryption_limit" in line]
    assert [(e["resource"], e["version"], e["limit"]) for e in limits] == [
        ("credentials", 1, 5),
        ("credentials", 2, 5),
        ("credentials", 3, 5),
    ]
    assert limits[-1]["encryptions"] == 6

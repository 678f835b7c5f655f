"""`python -m services.audit verify-store` (services/audit/verify_cmd.py, services/audit/integrity.py): the log
verified from its database with public keys obtained out of band, on SQLite and PostgreSQL — a live log passes;
an index column an attacker changed (so that Query by principal misses the entry) is named, where the Merkle tree,
and so `tradeguard audit verify` through the service, still verifies; altered bytes are named as before; the
command's exit codes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.audit.integrity import column_problems
from services.audit.store import ENTRY_COLUMNS, AuditStore
from services.audit.verify_cmd import verify_store
from tests.tradeguard.cli.test_audit_cmd import ROOT, Suite, any_suite, suite
from tradeguard.audit import tlog
from tradeguard.keyvault.v1 import keyvault_pb2 as kv
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.mesh import tls
from tradeguard.mesh.channel import MeshChannel

__all__ = ["any_suite", "suite"]  # the fixtures, imported for pytest


async def public_keys(suite: Suite) -> list[bytes]:
    """The checkpoint key's public keys, read from the key vault as ops (the auditor's out-of-band copy)."""
    target = f"127.0.0.1:{suite.env['TRADEGUARD_KEYVAULT_PORT']}"
    async with MeshChannel(target, "keyvault", tls.Workload.of(suite.paths, "ops")) as channel:
        reply = await keyvault_pb2_grpc.KeyVaultServiceStub(channel).GetKey(
            kv.GetKeyRequest(name="audit/checkpoint"), timeout=10
        )
    return [bytes(version.public_key) for version in reply.key.versions]


def pem_file(path: Path, keys: list[bytes]) -> Path:
    path.write_bytes(
        b"".join(
            Ed25519PublicKey.from_public_bytes(key).public_bytes(
                Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
            )
            for key in keys
        )
    )
    return path


async def test_a_live_log_verifies_and_a_changed_index_column_is_named(any_suite: Suite) -> None:
    suite, database = any_suite, any_suite.database
    await suite.append(300)
    await suite.signed(300)
    keys = await public_keys(suite)
    store = await database.declaration().stores.open(database.url)  # as the service opens it
    try:
        await _attacked_and_verified(suite, store, keys)
    finally:
        await store.close()


async def _attacked_and_verified(suite: Suite, store: AuditStore, keys: list[bytes]) -> None:
    database = suite.database
    report = await verify_store(store, keys)
    assert report.ok and report.entries == 300 and report.checkpoints >= 1, report.problems

    # an attacker past the triggers makes entry 123 (bob's) invisible to a Query by principal: bytes untouched
    database.attack("UPDATE {schema}.entries SET principal = %s WHERE sequence = %s", ("nobody", 123))
    report = await verify_store(store, keys)
    assert report.problems == ["entry 123: column principal is 'nobody', its bytes say 'bob'"]
    # the tree alone cannot see it: the service's own verify (bytes and checkpoints) still passes
    done = await suite.run("audit", "verify")
    assert done.returncode == 0, done.stdout

    # bytes altered under their stored hash: the tree names it, the columns too (the decoded entry differs)
    forged = database.entry_bytes(200).replace(b"alice", b"mallo")
    database.attack("UPDATE {schema}.entries SET entry_bytes = %s WHERE sequence = %s", (forged, 200))
    report = await verify_store(store, keys)
    assert any(p.startswith("entry 200: column leaf_hash") for p in report.problems), report.problems
    assert any("entry 200: altered" in p for p in report.problems), report.problems


def test_column_problems_of_a_row_and_of_bytes_that_are_not_an_entry() -> None:
    row = [0, "spiffe://x/svc/trading", "e-1", b"", b"\xff\xff", tlog.leaf_hash(b"\xff\xff")]
    row += ["", "", "", "", 1, 0, 0]
    assert len(row) == len(ENTRY_COLUMNS)
    (problem,) = column_problems(row)
    assert problem.startswith("entry 0: its bytes are not an entry")


async def test_the_command_exit_codes(suite: Suite, tmp_path: Path) -> None:
    await suite.append(50)
    await suite.signed(50)
    keys = pem_file(tmp_path / "checkpoint.pem", await public_keys(suite))
    env = {**suite.env, "TRADEGUARD_AUDIT_DATABASE_URL": suite.database.url}

    async def verify_store_command(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.audit",
            "verify-store",
            *args,
            env=env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    code, out, _ = await verify_store_command("--public-key", str(keys))
    assert code == 0 and out.startswith("ok: 50 entries, "), out
    suite.database.attack("UPDATE {schema}.entries SET method = %s WHERE sequence = %s", ("/x.Y/Z", 7))
    code, out, _ = await verify_store_command("--public-key", str(keys))
    assert code == 1 and out.startswith("FAILED: entry 7: column method is '/x.Y/Z'"), out
    other = pem_file(tmp_path / "other.pem", [bytes(32)])
    code, out, _ = await verify_store_command("--public-key", str(other))
    assert code == 1 and "FAILED" in out  # no checkpoint verifies under a key that did not sign it
    (tmp_path / "empty.pem").write_text("# nothing\n")
    code, _, err = await verify_store_command("--public-key", str(tmp_path / "empty.pem"))
    assert code == 2 and "holds no key" in err
    code, _, err = await verify_store_command()  # keys come from the auditor, never from the log: required
    assert code == 2 and "--public-key" in err

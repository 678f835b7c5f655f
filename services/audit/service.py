"""The audit service, declared once: the kit's runner (tradeguard.service) turns this into a running server.

What `build` wires, in order:
- the log: the store the runner opened (SQLite by default, `$TRADEGUARD_HOME/data/audit.db`; PostgreSQL by URL),
  and the core (`AuditLog`: masking, record time, encoding, hashing, group commit) opened on it (its size and
  root loaded);
- the key vault: a `MeshChannel` to it as workload `audit` (closed by a closer) and a `VaultSigner` on the
  checkpoint key (`audit/checkpoint` by default; `tradeguard up` and the tests create it as ops);
- the checkpoint publisher (services/audit/checkpoints.py) as a background task: a signed checkpoint at most
  every CHECKPOINT_INTERVAL_S while the log grows; a signing failure is logged and retried, the service keeps
  serving (appends never wait for a signature);
- retention (services/audit/retention.py) as a background task: every RETENTION_INTERVAL_S, the entries older
  than RETENTION_DAYS (and covered by a signed checkpoint) are archived to segment files in ARCHIVE_DIR, then
  removed from the database; a failing pass is logged and retried at the next interval;
- the servicer (services/audit/servicer.py).

At shutdown (closers, in reverse order): the core's pending appends finish, then a last checkpoint is signed
for them, then the channel to the vault closes; the runner closes the store last.
"""

from __future__ import annotations

import contextlib
from typing import Final

from services.audit import codec, policy, verify_cmd
from services.audit.checkpoints import CheckpointPublisher
from services.audit.core import AuditLog
from services.audit.retention import Retention
from services.audit.servicer import AuditServicer
from services.audit.settings import Settings
from services.audit.store import AuditStore
from services.audit.store_postgres import PostgresAuditStore
from services.audit.store_sqlite import SqliteAuditStore
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.keyvault.signer import VaultSigner
from tradeguard.mesh import tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.service import Assembly, Closer, Declaration, Stores, Wiring
from tradeguard.storage import clock_us

__all__ = ["SERVICE", "SUMMARY", "WORKLOAD", "build", "vault_channel"]

WORKLOAD: Final = "audit"  # who the audit service is to the key vault
SUMMARY: Final = (
    "The audit service: an append-only, tamper-evident log of every call (RFC 6962 Merkle tree, C2SP signed "
    "checkpoints by the key vault, inclusion and consistency proofs), durable before it answers; queries and tail."
)


def vault_channel(settings: Settings) -> MeshChannel:
    """The channel to the key vault, as workload `audit` (its certificate from the same PKI as the server's)."""
    workload = tls.Workload.of(settings.server.pki, WORKLOAD)
    return MeshChannel(settings.keyvault_target, settings.keyvault_server_name, workload)


async def build(wiring: Wiring[Settings, AuditStore]) -> Assembly:
    settings, store = wiring.settings, wiring.store
    closers: list[Closer] = []
    try:
        log = AuditLog(store, codec.encode_entry, codec.event_digest, clock_us)
        await log.open()
        channel = vault_channel(settings)
        closers.append(channel.close)
        signer = VaultSigner(channel, settings.checkpoint_key)
        publisher = CheckpointPublisher(
            log, store, signer, settings.origin, settings.checkpoint_interval_s, clock_us
        )
        closers.append(publisher.close)
        closers.append(log.close)
        retention = Retention(
            store,
            settings.archive_path,
            settings.retention_days,
            settings.retention_interval_s,
            clock_us,
        )
        servicer = AuditServicer(log, store)
    except BaseException:
        for closer in reversed(closers):
            with contextlib.suppress(Exception):
                await closer()
        raise

    async def publish_checkpoints() -> None:
        await publisher.run()

    async def keep_retention() -> None:
        await retention.run()

    return Assembly(servicer, tasks=[publish_checkpoints, keep_retention], closers=closers, core=log)


SERVICE: Declaration[Settings, AuditStore] = Declaration(
    name="audit",
    summary=SUMMARY,
    register=audit_pb2_grpc.add_AuditServiceServicer_to_server,
    rules=lambda settings: policy.rules(settings.guard_workloads),
    settings=Settings.read,
    stores=Stores(sqlite=SqliteAuditStore.open, postgres=PostgresAuditStore.open),
    build=build,
    commands={"verify-store": verify_cmd.main},
)

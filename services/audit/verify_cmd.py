"""`python -m services.audit verify-store`: verify the audit log from its database, without the service.

For an auditor with read access to the database (the audit service's own TRADEGUARD_AUDIT_DATABASE_URL, SQLite or
PostgreSQL) and the checkpoint key's public keys obtained out of band (`--public-key FILE`, repeatable: PEM or C2SP
verifier keys, as `tradeguard audit verify --public-key` reads them). It checks what `tradeguard audit verify`
checks — the Merkle tree recomputed from every stored entry's bytes against every signed checkpoint, consecutive
checkpoints consistent, the first altered, missing or reordered entry named; with `--archive-dir`, the entries
retention archived — and what only the database shows: every stored row's columns against its bytes
(services/audit/integrity.py), so that an index column changed to hide an entry from `Query` is found.

Exit status: 0 when everything verifies, 1 when something does not (each problem printed, the first one first),
2 when it could not run (no database, unreadable key file).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Final

from services.audit.integrity import column_problems
from services.audit.model import Checkpoint, StoredEntry
from services.audit.store import ENTRY_COLUMNS, AuditStore
from tradeguard.audit.verify import EntryLike, Report, archived_entries, verify_log, with_archive
from tradeguard.settings import SettingsError

__all__ = ["main", "verify_store"]

PAGE: Final = 1000
_SEQUENCE, _BYTES, _LEAF = (ENTRY_COLUMNS.index(c) for c in ("sequence", "entry_bytes", "leaf_hash"))


async def _checkpoints(store: AuditStore) -> list[Checkpoint]:
    found: list[Checkpoint] = []
    after = 0  # (a checkpoint of the empty tree proves nothing)
    while page := await store.checkpoints(after, PAGE):
        found += page
        after = page[-1].tree_size
    return found


async def _rows(store: AuditStore, report: Report) -> AsyncIterator[EntryLike]:
    """Every stored entry in order, each row's columns checked against its bytes (problems to `report`)."""
    start, size = await store.pruned(), await store.size()
    while start < size:
        rows = await store.rows(start, PAGE)
        for row in rows:
            for problem in column_problems(row):
                report.problem(problem)
            yield StoredEntry(int(row[_SEQUENCE]), bytes(row[_BYTES]), bytes(row[_LEAF]))
        start += PAGE


async def verify_store(
    store: AuditStore,
    public_keys: Sequence[bytes],
    *,
    origin: str | None = None,
    archive_dir: Path | None = None,
) -> Report:
    """The log in `store` verified (see the module): the tree against its checkpoints and every row's columns."""
    report = Report()
    stream: AsyncIterator[EntryLike] = _rows(store, report)
    if archive_dir is not None:
        stream = with_archive(archived_entries(archive_dir, report), stream, report)
    return await verify_log(stream, await _checkpoints(store), public_keys, origin=origin, report=report)


def main(argv: Sequence[str], env: dict[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.audit verify-store", description=__doc__)
    parser.add_argument(
        "--public-key",
        dest="public_keys",
        action="append",
        type=Path,
        required=True,
        metavar="FILE",
        help="a checkpoint public key file (PEM or C2SP verifier keys), obtained out of band; repeatable",
    )
    parser.add_argument(
        "--archive-dir", type=Path, metavar="DIR", help="the archive segments of pruned entries"
    )
    parser.add_argument(
        "--origin", help="the checkpoints' expected origin (default: the first verified one's)"
    )
    args = parser.parse_args(argv)
    # imported here: the declaration names this command, and the service need not load the command line's modules
    from services.audit.service import SERVICE
    from tradeguard.cli.audit_cmd import read_public_keys
    from tradeguard.cli.common import CliError
    from tradeguard.cli.mesh_call import printable
    from tradeguard.service import read_settings

    try:
        settings = read_settings(SERVICE, dict(os.environ) if env is None else env)
        keys = [key for path in args.public_keys for key in read_public_keys(path)]
    except (SettingsError, CliError) as error:
        print(f"verify-store: {error}", file=sys.stderr)
        return 2

    async def run() -> Report:
        store = await SERVICE.stores.open(settings.database_url)
        try:
            return await verify_store(store, keys, origin=args.origin, archive_dir=args.archive_dir)
        finally:
            await store.close()

    report = asyncio.run(run())
    print(printable(report.summary()))  # stored values are shown: never a terminal control sequence
    for problem in report.problems[1:]:
        print(f"  {printable(problem)}")
    for note in report.notes:
        print(f"  note: {printable(note)}")
    return 0 if report.ok else 1

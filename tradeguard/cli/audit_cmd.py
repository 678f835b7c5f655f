"""`tradeguard audit …`: search, follow, verify and export the audit log; over the mesh as `ops` (the audit
service lets ops and the monitor read) unless --as says otherwise.

- `query`: entries by principal, API key, account, method, outcome and event time (--since/--until: RFC 3339,
  e.g. 2026-11-30T12:00:00Z, or an age such as 15m, 2h, 7d), oldest first, up to --limit; one line each, or
  with --json one JSON object per line (the compliance export's columns).
- `tail`: the entries from --from (default: the latest checkpoint's size), then each new one as it is appended;
  after a disconnect it reconnects and resumes from the next sequence number (no gap, no duplicate). --format
  text, json, cef or ocsf; --count stops after that many.
- `verify`: reads every entry (GetEntries) and checkpoint (ListCheckpoints) and checks them with
  tradeguard.audit.verify, independently of the service's own state: the leaf hashes recomputed from the bytes,
  the roots at every signed checkpoint, every checkpoint's signature under the checkpoint key's public keys (from
  the key vault's GetKey on --key, default audit/checkpoint, or --public-key files), the service's consistency
  proofs between checkpoints; with --against, the leaf hashes an earlier export recorded. A log whose oldest
  entries retention archived and removed is verified with --archive-dir (the audit service's
  TRADEGUARD_AUDIT_ARCHIVE_DIR): the archive segments' entries, each file checked and chained, merged with the
  stored ones, the whole tree recomputed from entry 0 (an altered or missing segment is named); without it, the
  entries missing from the log's start are reported (never a silent success) with that hint. Exit status 0: the
  log verifies; 1: it does not, the first problem named (`entry 1234: altered (…)`); 2: it could not be checked
  (a service unreachable, no key).
- `export`: the entries of a period (--since, --until) as csv or json (the compliance export: RFC 4180 CSV, JSON
  lines, one fixed column list) or ocsf (OCSF 1.3.0 JSON lines) or cef (CEF lines), to stdout or --output (created
  owner-only); or, as cef or ocsf, to a syslog receiver (--syslog HOST:PORT) over TCP or, with --tls, TLS 1.3
  (the receiver's certificate checked against --ca, default the suite's CA bundle), each entry one RFC 5424
  message in RFC 6587 octet-counted framing.

A public key file holds one key per line as a C2SP note verifier key (`name+hash+base64(0x01 || key)`) or the
base64 of the raw 32-byte Ed25519 key, or PEM "PUBLIC KEY" blocks (Ed25519 SubjectPublicKeyInfo).

Entries are decoded here from the bytes the log hashed (`entry_bytes`), never from the service's decoded copy.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import csv
import io
import json
import os
import re
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from tradeguard.audit import siem, tlog
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.audit.verify import EntryLike, Report, archived_entries, verify_log, with_archive
from tradeguard.cli import common
from tradeguard.cli.mesh_call import call_service, describe, printable
from tradeguard.keyvault.v1 import keyvault_pb2 as kv
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.mesh import pki
from tradeguard.mesh.channel import MeshChannel
from tradeguard.rpc.status import rich_status

__all__ = [
    "SyslogTarget",
    "read_export",
    "read_public_keys",
    "record_of",
    "register",
    "send_syslog",
    "time_argument",
]

T = TypeVar("T")
if TYPE_CHECKING:
    Stub = audit_pb2_grpc.AuditServiceAsyncStub

SERVICE: Final = "audit"
TIMEOUT_S: Final = 30.0
PAGE: Final = 1000
DEFAULT_ORIGIN: Final = "tradeguard.local/audit"
DEFAULT_KEY: Final = "audit/checkpoint"
OUTCOMES: Final = (
    "ok",
    "denied_authentication",
    "denied_permission",
    "denied_quota",
    "denied_risk",
    "invalid",
)
OUTCOMES_ALL: Final = (*OUTCOMES, "failed", "unknown")
_SPKI_ED25519: Final = bytes.fromhex("302a300506032b6570032100")  # DER prefix of an Ed25519 public key


# --- arguments ---------------------------------------------------------------------------------------------------

_AGE: Final = re.compile(r"([0-9]{1,9})(s|m|h|d)")


def time_argument(value: str, *, now: datetime | None = None) -> datetime:
    """RFC 3339 / ISO 8601 (a time without offset is UTC) or an age (`30s`, `15m`, `2h`, `7d`: that long ago)."""
    age = _AGE.fullmatch(value.strip())
    if age:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[age.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: int(age.group(1))})
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a time (2026-11-30T12:00:00Z) nor an age (30s, 15m, 2h, 7d)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _positive(value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {number}")
    return number


def _sequence(value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a sequence number, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


class SyslogTarget:
    """HOST:PORT of a syslog receiver ([v6]:PORT for an IPv6 address)."""

    def __init__(self, value: str) -> None:
        host, sep, port = value.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
        self.host, self.port = host, int(port)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = common.service_command(
        subparsers, "audit", "the audit log: query, tail, verify, export", __doc__, service=SERVICE, run=_run
    )

    def action(
        name: str, help_text: str, handler: Callable[[argparse.Namespace], Awaitable[int]]
    ) -> argparse.ArgumentParser:
        parser = command(name, help_text)
        parser.set_defaults(handler=handler)
        return parser

    query = action("query", "find entries by who, what, outcome and time", _query)
    query.add_argument("--principal", default="", help="the verified user")
    query.add_argument("--key", dest="api_key_id", default="", help="the API key id")
    query.add_argument("--account", dest="account_id", default="", help="the account acted for")
    query.add_argument("--method", default="", help="the full gRPC method (/pkg.Service/Method)")
    query.add_argument("--outcome", choices=OUTCOMES_ALL, help="how the call ended")
    query.add_argument(
        "--since", type=time_argument, help="from this event time (RFC 3339, or an age: 15m, 2h)"
    )
    query.add_argument("--until", type=time_argument, help="before this event time (RFC 3339, or an age)")
    query.add_argument("--limit", type=_positive, default=100, help="at most this many entries")
    query.add_argument("--json", action="store_true", help="one JSON object per entry (for scripts)")

    tail = action("tail", "follow the log from a sequence number, reconnecting after a disconnect", _tail)
    tail.add_argument(
        "--from",
        dest="start",
        type=_sequence,
        help="the first sequence number (default: the latest checkpoint's size)",
    )
    tail.add_argument(
        "--format", choices=("text", "json", "cef", "ocsf"), default="text", help="how each is printed"
    )
    tail.add_argument("--count", type=_positive, help="stop after this many entries")

    verify = action("verify", "check the whole log against its signed checkpoints, independently", _verify)
    verify.add_argument(
        "--public-key",
        dest="public_keys",
        action="append",
        type=Path,
        metavar="FILE",
        help="trust these checkpoint keys (repeatable) instead of the key vault's",
    )
    verify.add_argument(
        "--against",
        type=Path,
        metavar="EXPORT",
        help="also compare each entry with the leaf hash an earlier `audit export` (csv or json) recorded",
    )
    verify.add_argument(
        "--archive-dir",
        type=Path,
        metavar="DIR",
        help="the archive segments of the entries retention removed (TRADEGUARD_AUDIT_ARCHIVE_DIR of the service)",
    )
    verify.add_argument(
        "--key", dest="key_name", default=DEFAULT_KEY, help="the checkpoint key's name in the key vault"
    )
    verify.add_argument(
        "--keyvault",
        metavar="HOST:PORT",
        help="the key vault (default: $TRADEGUARD_KEYVAULT_PORT on the suite's host)",
    )
    verify.add_argument(
        "--origin",
        default=os.environ.get("TRADEGUARD_AUDIT_ORIGIN", "").strip() or DEFAULT_ORIGIN,
        help="the checkpoints' origin (and signer name): $TRADEGUARD_AUDIT_ORIGIN, else " + DEFAULT_ORIGIN,
    )

    export = action(
        "export", "a period's entries as CSV, JSON, OCSF or CEF, to a file or a syslog receiver", _export
    )
    export.add_argument(
        "--since", type=time_argument, required=True, help="from this event time (RFC 3339 or an age)"
    )
    export.add_argument(
        "--until", type=time_argument, required=True, help="before this event time (RFC 3339 or an age)"
    )
    export.add_argument(
        "--format", choices=("csv", "json", "ocsf", "cef"), default="csv", help="the export's format"
    )
    export.add_argument(
        "--output", type=Path, metavar="FILE", help="write here (owner-only) instead of stdout"
    )
    export.add_argument(
        "--syslog", type=SyslogTarget, metavar="HOST:PORT", help="send to this syslog receiver"
    )
    export.add_argument("--tls", action="store_true", help="to the syslog receiver over TLS 1.3 (RFC 5425)")
    export.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help="the CA the receiver's certificate must chain to (default: the suite's)",
    )
    export.add_argument(
        "--tls-name",
        metavar="NAME",
        help="the name the receiver's certificate must carry (default: the host)",
    )
    export.add_argument("--hostname", default=socket.gethostname(), help="the syslog messages' HOSTNAME")


def _run(args: argparse.Namespace) -> int:
    try:
        code: int = asyncio.run(args.handler(args))
    except KeyboardInterrupt:
        return 130
    return code


# --- entries ------------------------------------------------------------------------------------------------------


def _us(value: timestamp_pb2.Timestamp) -> int:
    return value.seconds * 1_000_000 + value.nanos // 1000


def _name(enum: object, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def record_of(stored: pb.StoredEntry) -> siem.Record:
    """The entry decoded from the bytes the log hashed (not the service's decoded copy)."""
    entry = pb.Entry.FromString(stored.entry_bytes)
    event = entry.event
    return siem.Record(
        sequence=stored.sequence,
        record_time_us=_us(entry.record_time),
        recorder=entry.recorder,
        event_id=event.event_id,
        time_us=_us(event.time),
        outcome=_name(pb.Outcome, event.outcome, "OUTCOME_"),
        method=event.method,
        principal=event.principal,
        account_id=event.account_id,
        api_key_id=event.api_key_id,
        caller=event.caller,
        source_ip=event.source_ip,
        resource=event.resource,
        action=event.action,
        quota_decision=event.quota_decision,
        risk_decision=event.risk_decision,
        status_code=event.status_code,
        request_id=event.request_id,
        trace_id=event.trace_id,
        latency_us=event.latency.seconds * 1_000_000 + event.latency.nanos // 1000,
        clock_sync=_name(pb.ClockSync, event.clock.sync, "CLOCK_SYNC_"),
        clock_estimated_error_us=event.clock.estimated_error_us,
        clock_max_error_us=event.clock.max_error_us,
        details=dict(event.details),
        leaf_hash=bytes(stored.leaf_hash),
    )


def _text(record: siem.Record) -> str:
    what = record.method or record.action or "-"
    parts = [
        f"{record.sequence:>8}",
        siem.timestamp(record.time_us),
        f"{record.outcome:<21}",
        record.principal or "-",
        what,
        record.resource or "-",
        record.status_code or "-",
    ]
    return printable("  ".join(parts))


def _formatter(kind: str, hostname: str | None = None) -> Callable[[siem.Record], str]:
    """One entry as one line of `kind` (a syslog message when `hostname` is given)."""
    line: Callable[[siem.Record], str] = {
        "text": _text,
        "json": siem.json_line,
        "csv": lambda r: "".join(siem.csv_lines([r], header=False)).removesuffix("\r\n"),
        "cef": siem.cef,
        "ocsf": lambda r: json.dumps(siem.ocsf(r), ensure_ascii=False, separators=(",", ":")),
    }[kind]
    if hostname is None:
        return line
    procid = str(os.getpid())
    return lambda r: siem.syslog(r, line(r), hostname=hostname, procid=procid)


def _query_request(args: argparse.Namespace, **times: datetime | None) -> pb.QueryRequest:
    request = pb.QueryRequest(
        principal=getattr(args, "principal", ""),
        api_key_id=getattr(args, "api_key_id", ""),
        account_id=getattr(args, "account_id", ""),
        method=getattr(args, "method", ""),
        page_size=PAGE,
    )
    if getattr(args, "outcome", None):
        request.outcome = pb.Outcome.Value(f"OUTCOME_{args.outcome.upper()}")
    for field, moment in (("start_time", times.get("since")), ("end_time", times.get("until"))):
        if moment is not None:
            getattr(request, field).FromDatetime(moment.astimezone(UTC).replace(tzinfo=None))
    return request


async def _pages(stub: Stub, request: pb.QueryRequest, limit: int | None) -> AsyncIterator[pb.StoredEntry]:
    sent = 0
    while True:
        if limit is not None:
            request.page_size = min(PAGE, limit - sent)
        reply = await stub.Query(request, timeout=TIMEOUT_S)
        for entry in reply.entries:
            yield entry
            sent += 1
        if not reply.next_page_token or (limit is not None and sent >= limit):
            return
        request.page_token = reply.next_page_token


async def _call(args: argparse.Namespace, call: Callable[[Stub], Awaitable[T]]) -> T | None:
    return await call_service(args, SERVICE, lambda channel: call(audit_pb2_grpc.AuditServiceStub(channel)))


# --- query ----------------------------------------------------------------------------------------------------------


async def _query(args: argparse.Namespace) -> int:
    request = _query_request(args, since=args.since, until=args.until)
    show = _formatter("json" if args.json else "text")

    async def run(stub: Stub) -> int:
        count = 0
        async for stored in _pages(stub, request, args.limit):
            print(show(record_of(stored)))
            count += 1
        return count

    count = await _call(args, run)
    if count is None:
        return 1
    if not args.json:
        print(f"{count} entr{'y' if count == 1 else 'ies'}", file=sys.stderr)
    return 0


# --- tail -----------------------------------------------------------------------------------------------------------

_RECONNECT: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


async def _tail(args: argparse.Namespace) -> int:
    target = args.target or common.target(SERVICE)
    workload = common.workload(args.home, args.identity)
    show = _formatter(args.format)
    following: int | None = args.start
    printed = 0
    backoff = 0.1
    while True:
        try:
            async with MeshChannel(target, SERVICE, workload) as channel:
                stub = audit_pb2_grpc.AuditServiceStub(channel)
                if following is None:
                    latest = await stub.GetCheckpoint(pb.GetCheckpointRequest(), timeout=TIMEOUT_S)
                    following = latest.checkpoint.tree_size
                stream = stub.Tail(pb.TailRequest(start=following))
                async for reply in stream:
                    if reply.entry.sequence != following:
                        print(
                            f"tail: the service sent entry {reply.entry.sequence} where {following} was due",
                            file=sys.stderr,
                        )
                        return 1
                    print(show(record_of(reply.entry)), flush=True)
                    following += 1
                    printed += 1
                    backoff = 0.1
                    if args.count is not None and printed >= args.count:
                        stream.cancel()
                        return 0
            reason = "the stream ended"
        except grpc.aio.AioRpcError as error:
            if error.code() not in _RECONNECT:
                print(describe(rich_status(error)), file=sys.stderr)
                return 1
            reason = describe(rich_status(error))
        print(f"tail: {reason}; reconnecting from sequence {following}", file=sys.stderr, flush=True)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


# --- verify ---------------------------------------------------------------------------------------------------------


_VKEY: Final = re.compile(r"([^+\s]+)\+([0-9a-f]{8})\+(\S+)")  # C2SP signed-note verifier key


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return b""


def read_public_keys(path: Path) -> list[bytes]:
    """The raw Ed25519 public keys in `path` (see the module's docstring); CliError naming the line otherwise."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise common.CliError(f"--public-key {path}: cannot read it ({error})") from None
    keys: list[bytes] = []
    for block in re.findall(r"-----BEGIN PUBLIC KEY-----(.*?)-----END PUBLIC KEY-----", text, re.DOTALL):
        try:
            der = base64.b64decode("".join(block.split()), validate=True)
        except (binascii.Error, ValueError):
            raise common.CliError(f"--public-key {path}: a PEM block is not base64") from None
        if len(der) != len(_SPKI_ED25519) + 32 or not der.startswith(_SPKI_ED25519):
            raise common.CliError(f"--public-key {path}: a PEM key that is not Ed25519")
        keys.append(der[len(_SPKI_ED25519) :])
    text = re.sub(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", "", text, flags=re.DOTALL)
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        vkey = _VKEY.fullmatch(line)
        if vkey is not None and len(data := _b64(vkey.group(3))) == 33 and data[0] == 1:
            if tlog.key_hash(vkey.group(1), data[1:]).hex() != vkey.group(2):
                raise common.CliError(
                    f"--public-key {path}:{number}: the verifier key's hash does not match its key"
                )
            keys.append(data[1:])
        elif len(data := _b64(line)) == 32:
            keys.append(data)
        else:
            raise common.CliError(
                f"--public-key {path}:{number}: not a note verifier key (name+hash+key) or a base64 Ed25519 key"
            )
    if not keys:
        raise common.CliError(f"--public-key {path}: holds no key")
    return keys


def read_export(path: Path) -> dict[int, bytes]:
    """sequence → leaf hash from an earlier `audit export` in csv or json (CliError naming the line otherwise)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise common.CliError(f"--against {path}: cannot read it ({error})") from None
    rows: Iterable[Any]
    if text.lstrip().startswith("{"):
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise common.CliError(f"--against {path}:{error.lineno}: not a JSON line") from None
    else:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    found: dict[int, bytes] = {}
    for number, row in enumerate(rows, 1):
        try:
            sequence, leaf = int(row["sequence"]), bytes.fromhex(row["leaf_hash"])
        except (KeyError, TypeError, ValueError):
            raise common.CliError(
                f"--against {path}: row {number} has no sequence and leaf_hash (an `audit export` in csv or json)"
            ) from None
        if len(leaf) != 32:
            raise common.CliError(f"--against {path}: row {number}'s leaf_hash is not 32 bytes of hex")
        found[sequence] = leaf
    return found


async def _vault_keys(args: argparse.Namespace) -> list[bytes] | None:
    """The checkpoint key's public keys of every version that still verifies, from the key vault."""
    keyvault = argparse.Namespace(**vars(args))
    keyvault.target = args.keyvault

    async def get(channel: grpc.aio.Channel) -> kv.GetKeyResponse:
        stub = keyvault_pb2_grpc.KeyVaultServiceStub(channel)
        return await stub.GetKey(kv.GetKeyRequest(name=args.key_name), timeout=TIMEOUT_S)

    reply = await call_service(keyvault, "keyvault", get)
    if reply is None:
        return None
    key = reply.key
    if key.type != kv.KEY_TYPE_ED25519:
        raise common.CliError(f"the key vault's {args.key_name!r} is not an Ed25519 key")
    keys = [
        bytes(v.public_key)
        for v in key.versions
        if v.version >= key.min_decryption_version and len(v.public_key) == 32
    ]
    if not keys:
        raise common.CliError(f"the key vault's {args.key_name!r} has no version that verifies")
    return keys


class _ServiceProofs:
    def __init__(self, stub: Stub) -> None:
        self._stub = stub

    async def inclusion(self, index: int, size: int) -> tuple[bytes, Sequence[bytes]]:
        reply = await self._stub.GetInclusionProof(
            pb.GetInclusionProofRequest(sequence=index, tree_size=size), timeout=TIMEOUT_S
        )
        if reply.tree_size != size:
            raise ValueError(f"the service proved against size {reply.tree_size}, not {size}")
        return bytes(reply.leaf_hash), [bytes(h) for h in reply.hashes]

    async def consistency(self, size1: int, size2: int) -> Sequence[bytes]:
        reply = await self._stub.GetConsistencyProof(
            pb.GetConsistencyProofRequest(first_size=size1, second_size=size2), timeout=TIMEOUT_S
        )
        return [bytes(h) for h in reply.hashes]


async def _checkpoints(stub: Stub) -> list[pb.SignedCheckpoint]:
    found: list[pb.SignedCheckpoint] = []
    after = 0  # (a checkpoint of the empty tree proves nothing)
    while True:
        reply = await stub.ListCheckpoints(
            pb.ListCheckpointsRequest(after_size=after, page_size=PAGE), timeout=TIMEOUT_S
        )
        found += reply.checkpoints
        if not reply.checkpoints or reply.checkpoints[-1].tree_size <= after:
            return found
        after = reply.checkpoints[-1].tree_size


async def _entries(stub: Stub, until: int) -> AsyncIterator[pb.StoredEntry]:
    """Every stored entry in order, across gaps (up to `until`, the largest checkpoint's size, at least), from the
    first one stored (found with Query: the entries retention removed are not read page by page)."""
    first = await stub.Query(pb.QueryRequest(page_size=1), timeout=TIMEOUT_S)
    start = first.entries[0].sequence if first.entries else until  # none stored: none below `until`
    while True:
        reply = await stub.GetEntries(pb.GetEntriesRequest(start=start, count=PAGE), timeout=TIMEOUT_S)
        for entry in reply.entries:
            yield entry
        if reply.entries:
            start = max(start, reply.entries[-1].sequence + 1)
        elif start + PAGE < until:
            start += PAGE  # a gap of a whole page: the checkpoints say there is more
        else:
            return


async def _verify(args: argparse.Namespace) -> int:
    keys: list[bytes] | None
    if args.public_keys:
        keys = [key for path in args.public_keys for key in read_public_keys(path)]
    else:
        keys = await _vault_keys(args)
    if keys is None:
        return 2
    exported = read_export(args.against) if args.against is not None else None
    archive_dir: Path | None = args.archive_dir
    first_stored: list[int] = []  # the first stored entry's sequence, once seen

    async def noting_first(entries: AsyncIterator[pb.StoredEntry]) -> AsyncIterator[EntryLike]:
        async for entry in entries:
            if not first_stored:
                first_stored.append(entry.sequence)
            yield entry

    async def run(stub: Stub) -> Report:
        checkpoints = await _checkpoints(stub)
        largest = max((c.tree_size for c in checkpoints), default=0)
        report = Report()
        stream: AsyncIterator[EntryLike] = noting_first(_entries(stub, largest))
        if archive_dir is not None:
            stream = with_archive(archived_entries(archive_dir, report), stream, report)
        return await verify_log(
            stream,
            checkpoints,
            keys,
            origin=args.origin,
            proofs=_ServiceProofs(stub),
            exported=exported,
            report=report,
        )

    report = await _call(args, run)
    if report is None:
        return 2
    print(printable(report.summary()))
    for problem in report.problems[1:]:  # the first is the summary's
        print(f"  {printable(problem)}")
    for note in report.notes:
        print(f"  note: {printable(note)}")
    if archive_dir is None and not report.ok and (not first_stored or first_stored[0] > 0):
        start = f"to {first_stored[0] - 1} " if first_stored else ""
        print(
            f"  entries 0 {start}are not in the log: if retention archived and removed them, verify them "
            "with --archive-dir DIR (the audit service's TRADEGUARD_AUDIT_ARCHIVE_DIR)"
        )
    return 0 if report.ok else 1


# --- export ---------------------------------------------------------------------------------------------------------


def _tls_context(ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


async def send_syslog(
    frames: AsyncIterator[bytes] | Iterable[bytes],
    target: SyslogTarget,
    context: ssl.SSLContext | None,
    *,
    server_name: str | None = None,
) -> int:
    """Send RFC 6587 frames to `target` over TCP (TLS with `context`, the receiver's certificate checked for
    `server_name`, default the host); how many were sent."""
    _, writer = await asyncio.open_connection(
        target.host,
        target.port,
        ssl=context,
        server_hostname=(server_name or target.host) if context else None,
    )
    sent = 0
    try:
        if isinstance(frames, AsyncIterator):
            async for data in frames:
                writer.write(data)
                sent += 1
                await writer.drain()
        else:
            for data in frames:
                writer.write(data)
                sent += 1
                await writer.drain()
        if context is None:
            writer.write_eof()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return sent


def _open_output(path: Path) -> IO[str]:
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as error:
        raise common.CliError(f"--output {path}: cannot write it ({error.strerror})") from None
    return os.fdopen(descriptor, "w", encoding="utf-8", newline="")


async def _export(args: argparse.Namespace) -> int:
    if args.until <= args.since:
        raise common.CliError("--until must be after --since")
    if args.syslog is not None and args.format not in ("cef", "ocsf"):
        raise common.CliError("--syslog sends cef or ocsf: add --format cef or --format ocsf")
    if (args.tls or args.tls_name or args.ca) and args.syslog is None:
        raise common.CliError("--tls, --tls-name and --ca apply to --syslog")
    if (args.tls_name or args.ca) and not args.tls:
        raise common.CliError("--tls-name and --ca apply to --tls")
    if args.output is not None and args.syslog is not None:
        raise common.CliError("--output or --syslog, not both")
    context = None
    if args.tls:
        ca = args.ca or pki.PkiPaths(args.home).ca_bundle
        try:
            context = _tls_context(ca)
        except (OSError, ssl.SSLError) as error:
            raise common.CliError(f"--ca {ca}: cannot use it ({error})") from None
    request = _query_request(args, since=args.since, until=args.until)

    async def to_syslog(stub: Stub) -> int:
        assert args.syslog is not None
        show = _formatter(args.format, hostname=args.hostname)

        async def frames() -> AsyncIterator[bytes]:
            async for stored in _pages(stub, request, None):
                yield siem.frame(show(record_of(stored)))

        return await send_syslog(frames(), args.syslog, context, server_name=args.tls_name)

    async def to_file(stub: Stub) -> int:
        out = _open_output(args.output) if args.output is not None else sys.stdout
        count = 0
        try:
            if args.format == "csv":
                out.write(next(iter(siem.csv_lines([]))))
            show = _formatter(args.format)
            end = "\r\n" if args.format == "csv" else "\n"
            async for stored in _pages(stub, request, None):
                out.write(show(record_of(stored)) + end)
                count += 1
        finally:
            if out is not sys.stdout:
                out.close()
            else:
                out.flush()
        return count

    try:
        count = await _call(args, to_syslog if args.syslog is not None else to_file)
    except (OSError, ssl.SSLError) as error:
        where = f"{args.syslog.host}:{args.syslog.port}" if args.syslog else str(args.output)
        raise common.CliError(f"cannot send to {where}: {error}") from None
    if count is None:
        return 1
    print(f"exported {count} entr{'y' if count == 1 else 'ies'}", file=sys.stderr)
    return 0

"""How audit entries leave for a SIEM or a regulator: formats only (pure: no I/O, no grpc or protobuf; the CLI
decodes entries into `Record`s and sends the lines).

- `cef(record)`: an ArcSight CEF:0 line, `CEF:0|Tradeguard|audit|1|<action>|<method>|<severity>|<extension>`.
  Header fields escape `\\` and `|` with a backslash, extension values escape `\\` and `=`, and in both a line
  break becomes `\\n` (`\\r` for a carriage return), so one event is one line whatever its fields hold. The
  extension uses CEF's dictionary keys (rt and start in ms since the epoch, suser, src or c6a2, act, request,
  outcome, reason, externalId, requestClientApplication …) and labelled custom fields (cs1..cs6, cn1..cn2) for
  the rest. Severity (0-10): `SEVERITY` by outcome.
- `syslog(record, message, …)`: an RFC 5424 message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] MSG`,
  facility 13 (log audit), the syslog severity by outcome (`SYSLOG_SEVERITY`), the record time in UTC with
  microseconds, app-name `tradeguard-audit`, MSGID `api-activity` or `authentication`, one structured-data element
  `[tradeguard@32473 sequence="…" eventId="…" outcome="…"]` (32473 is IANA's example enterprise number, RFC 5612:
  there is no registered one) with `"`, `\\` and `]` escaped, and MSG as UTF-8 without BOM (RFC 5424's MSG-ANY;
  many receivers mishandle the BOM). `frame(message)` is RFC 6587 octet counting for TCP and TLS: `LEN SP MSG`.
- `ocsf(record)`: one JSON object in the OCSF 1.3.0 schema: Authentication (class 3002, category 3) for logins,
  logouts, MFA and token refreshes (`is_authentication`), API Activity (class 6003, category 6) for everything
  else; time in ms, metadata.uid = the event id, metadata.sequence = the log position, actor.user, src_endpoint.ip,
  api.operation, status / status_id / status_code, severity_id, and the record in `unmapped` for what OCSF has no
  place for.
- `COLUMNS`, `row(record)`, `csv_lines(records)`, `json_line(record)`: the compliance export — a fixed column list,
  RFC 4180 CSV (CRLF line ends, fields quoted when they hold a comma, quote or line break, quotes doubled), and
  JSON lines with the same names (details as an object). Cells are written as recorded: a spreadsheet opening the
  CSV must not evaluate formulas (values starting with = + - @ are data here).
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

__all__ = [
    "APP_NAME",
    "COLUMNS",
    "FACILITY_AUDIT",
    "OCSF_VERSION",
    "SEVERITY",
    "SYSLOG_SEVERITY",
    "Record",
    "cef",
    "cef_escape_extension",
    "cef_escape_header",
    "csv_lines",
    "frame",
    "is_authentication",
    "json_line",
    "ocsf",
    "row",
    "syslog",
    "timestamp",
]

APP_NAME: Final = "tradeguard-audit"
FACILITY_AUDIT: Final = 13  # RFC 5424 table 1: log audit
SD_ID: Final = "tradeguard@32473"
OCSF_VERSION: Final = "1.3.0"
VENDOR: Final = "Tradeguard"
PRODUCT: Final = "audit"
PRODUCT_VERSION: Final = "1"

# CEF severity 0-10 and syslog severity (RFC 5424: 3 error, 4 warning, 5 notice, 6 informational) by outcome.
SEVERITY: Final[Mapping[str, int]] = {
    "OK": 1,
    "INVALID": 3,
    "DENIED_QUOTA": 4,
    "DENIED_PERMISSION": 6,
    "DENIED_RISK": 5,
    "DENIED_AUTHENTICATION": 6,
    "FAILED": 7,
    "UNKNOWN": 8,
}
SYSLOG_SEVERITY: Final[Mapping[str, int]] = {
    "OK": 6,
    "INVALID": 5,
    "DENIED_QUOTA": 5,
    "DENIED_PERMISSION": 4,
    "DENIED_RISK": 4,
    "DENIED_AUTHENTICATION": 4,
    "FAILED": 3,
    "UNKNOWN": 3,
}


@dataclass(frozen=True, slots=True)
class Record:
    """One stored entry, flattened: its position, the audit service's record, the event (enum values by name,
    e.g. outcome "DENIED_AUTHENTICATION", clock_sync "SYNCHRONIZED"), and its leaf hash."""

    sequence: int
    record_time_us: int
    recorder: str
    event_id: str
    time_us: int
    outcome: str
    method: str = ""
    principal: str = ""
    account_id: str = ""
    api_key_id: str = ""
    caller: str = ""
    source_ip: str = ""
    resource: str = ""
    action: str = ""
    quota_decision: str = ""
    risk_decision: str = ""
    status_code: str = ""
    request_id: str = ""
    trace_id: str = ""
    latency_us: int = 0
    clock_sync: str = "UNSPECIFIED"
    clock_estimated_error_us: int = 0
    clock_max_error_us: int = 0
    details: Mapping[str, str] = field(default_factory=dict)
    leaf_hash: bytes = b""


def timestamp(us: int) -> str:
    """RFC 3339 / RFC 5424 time in UTC with microseconds: `2026-11-30T12:00:00.123456Z`."""
    moment = datetime.fromtimestamp(us // 1_000_000, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{us % 1_000_000:06d}Z"


_AUTH_ACTIONS: Final = re.compile(
    r"(login|logout|logon|logoff|mfa|totp|token\.refresh|refresh|session)([._:-].*)?"
)
_AUTH_METHODS: Final = re.compile(
    r"/tradeguard\.auth\.v1\.AuthService/(Login|Logout|Refresh\w*|\w*Totp\w*|\w*Mfa\w*)"
)


def is_authentication(record: Record) -> bool:
    """A login, logout, MFA step or token refresh (by action, or by the auth service's method)."""
    return bool(_AUTH_ACTIONS.fullmatch(record.action.lower()) or _AUTH_METHODS.fullmatch(record.method))


# --- CEF -----------------------------------------------------------------------------------------------------


def _breaks(text: str) -> str:
    return text.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\r")


def cef_escape_header(text: str) -> str:
    """A CEF header field: `\\` → `\\\\`, `|` → `\\|`, line breaks → `\\n` / `\\r`."""
    return _breaks(text.replace("\\", "\\\\").replace("|", "\\|"))


def cef_escape_extension(text: str) -> str:
    """A CEF extension value: `\\` → `\\\\`, `=` → `\\=`, line breaks → `\\n` / `\\r`."""
    return _breaks(text.replace("\\", "\\\\").replace("=", "\\="))


def _ip_key(address: str) -> str | None:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return None
    return "src" if parsed.version == 4 else "c6a2"


def cef(record: Record) -> str:
    """The record as one CEF:0 line (see the module's docstring)."""
    name = record.action or "audit"
    header = [
        "CEF:0",
        VENDOR,
        PRODUCT,
        PRODUCT_VERSION,
        cef_escape_header(name),
        cef_escape_header(record.method or name),
        str(SEVERITY.get(record.outcome, 5)),
    ]
    pairs: list[tuple[str, str]] = [
        ("rt", str(record.record_time_us // 1000)),
        ("start", str(record.time_us // 1000)),
        ("externalId", record.event_id),
        ("outcome", record.outcome),
        ("cat", "authentication" if is_authentication(record) else "api-activity"),
    ]
    optional = [
        ("suser", record.principal),
        ("act", record.action),
        ("request", record.method),
        ("reason", record.status_code),
        ("requestClientApplication", record.caller),
        ("cs1Label", "accountId" if record.account_id else ""),
        ("cs1", record.account_id),
        ("cs2Label", "apiKeyId" if record.api_key_id else ""),
        ("cs2", record.api_key_id),
        ("cs3Label", "resource" if record.resource else ""),
        ("cs3", record.resource),
        ("cs4Label", "requestId" if record.request_id else ""),
        ("cs4", record.request_id),
        ("cs5Label", "decision" if record.quota_decision or record.risk_decision else ""),
        ("cs5", "; ".join(d for d in (record.quota_decision, record.risk_decision) if d)),
        ("cs6Label", "recorder" if record.recorder else ""),
        ("cs6", record.recorder),
    ]
    key = _ip_key(record.source_ip)
    if key:
        optional.append((key, record.source_ip))
    pairs += [(k, v) for k, v in optional if v]
    pairs += [("cn1Label", "sequence"), ("cn1", str(record.sequence))]
    pairs += [("cn2Label", "latencyMicros"), ("cn2", str(record.latency_us))]
    extension = " ".join(f"{k}={cef_escape_extension(v)}" for k, v in pairs)
    return "|".join(header) + "|" + extension


# --- RFC 5424 syslog and RFC 6587 framing ---------------------------------------------------------------------


def _header_token(text: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, at most `limit` characters; "-" if empty."""
    cleaned = "".join(c if "!" <= c <= "~" else "_" for c in text)[:limit]
    return cleaned or "-"


def _sd_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog(record: Record, message: str, *, hostname: str = "-", procid: str = "-") -> str:
    """An RFC 5424 syslog message carrying `message` (a CEF line or an OCSF object) for `record`."""
    pri = FACILITY_AUDIT * 8 + SYSLOG_SEVERITY.get(record.outcome, 5)
    msgid = "authentication" if is_authentication(record) else "api-activity"
    sd = (
        f'[{SD_ID} sequence="{record.sequence}" eventId="{_sd_value(record.event_id)}" '
        f'outcome="{_sd_value(record.outcome)}"]'
    )
    return (
        f"<{pri}>1 {timestamp(record.record_time_us)} {_header_token(hostname, 255)} {APP_NAME} "
        f"{_header_token(procid, 128)} {msgid} {sd} {message}"
    )


def frame(message: str) -> bytes:
    """RFC 6587 octet counting: the message's UTF-8 length in decimal, a space, the message."""
    data = message.encode("utf-8")
    return str(len(data)).encode("ascii") + b" " + data


# --- OCSF ----------------------------------------------------------------------------------------------------

_AUTH_ACTIVITY: Final = {"login": 1, "logon": 1, "logout": 2, "logoff": 2, "mfa": 6, "totp": 6}
_API_ACTIVITY: Final = {
    "create": 1,
    "place": 1,
    "read": 2,
    "get": 2,
    "list": 2,
    "update": 3,
    "delete": 4,
    "cancel": 4,
}


def _activity(words: str, table: Mapping[str, int]) -> int:
    for word in re.split(r"[^a-z]+", words.lower()):
        if word in table:
            return table[word]
    return 99  # Other


def ocsf(record: Record) -> dict[str, Any]:
    """The record as an OCSF 1.3.0 event object (Authentication 3002 or API Activity 6003)."""
    success = record.outcome == "OK"
    status_id = 1 if success else (0 if record.outcome in ("UNKNOWN", "UNSPECIFIED") else 2)
    severity = SEVERITY.get(record.outcome, 5)
    severity_id = 1 if severity <= 1 else 2 if severity <= 3 else 3 if severity <= 5 else 4
    user: dict[str, Any] = {"name": record.principal, "uid": record.principal}
    if record.account_id:
        user["account"] = {"uid": record.account_id}
    endpoint: dict[str, Any] = {"ip": record.source_ip} if _ip_key(record.source_ip) else {}
    if record.caller:
        endpoint["svc_name"] = record.caller
    event: dict[str, Any] = {
        "time": record.time_us // 1000,
        "severity_id": severity_id,
        "status": "Success" if success else ("Unknown" if status_id == 0 else "Failure"),
        "status_id": status_id,
        "status_code": record.status_code,
        "message": f"{record.action or record.method}: {record.outcome}",
        "metadata": {
            "version": OCSF_VERSION,
            "uid": record.event_id,
            "sequence": record.sequence,
            "logged_time": record.record_time_us // 1000,
            "product": {"name": "Tradeguard audit", "vendor_name": VENDOR, "version": PRODUCT_VERSION},
            "log_provider": record.recorder,
        },
        "src_endpoint": endpoint,
        "unmapped": {
            k: v for k, v in json.loads(json_line(record)).items() if k not in ("principal", "source_ip")
        },
    }
    decision = "; ".join(d for d in (record.quota_decision, record.risk_decision) if d)
    if decision:
        event["status_detail"] = decision
    if record.trace_id:
        event["metadata"]["correlation_uid"] = record.trace_id
    if is_authentication(record):
        activity = _activity(record.action or record.method.rsplit("/", 1)[-1], _AUTH_ACTIVITY)
        event |= {
            "category_uid": 3,
            "class_uid": 3002,
            "activity_id": activity,
            "type_uid": 3002 * 100 + activity,
            "user": user,
            "is_mfa": "mfa" in record.action.lower() or "totp" in record.action.lower(),
            "service": {"name": record.method.rsplit("/", 1)[0].lstrip("/") if record.method else ""},
        }
    else:
        activity = _activity(record.action or record.method.rsplit("/", 1)[-1], _API_ACTIVITY)
        service, _, operation = record.method.lstrip("/").partition("/")
        api: dict[str, Any] = {
            "operation": operation or record.method or record.action,
            "service": {"name": service},
        }
        if record.request_id:
            api["request"] = {"uid": record.request_id}
        event |= {
            "category_uid": 6,
            "class_uid": 6003,
            "activity_id": activity,
            "type_uid": 6003 * 100 + activity,
            "actor": {"user": user, "app_name": record.caller},
            "api": api,
        }
        if record.resource:
            event["resources"] = [{"uid": record.resource}]
    if record.latency_us:
        event["duration"] = record.latency_us // 1000
    return event


# --- the compliance export ------------------------------------------------------------------------------------

COLUMNS: Final = (
    "sequence",
    "record_time",
    "event_time",
    "event_id",
    "recorder",
    "principal",
    "account_id",
    "api_key_id",
    "caller",
    "source_ip",
    "method",
    "resource",
    "action",
    "outcome",
    "status_code",
    "quota_decision",
    "risk_decision",
    "request_id",
    "trace_id",
    "latency_us",
    "clock_sync",
    "clock_estimated_error_us",
    "clock_max_error_us",
    "details",
    "leaf_hash",
)


def row(record: Record) -> dict[str, Any]:
    """The export's row: COLUMNS in order; times RFC 3339 with µs, details an object, the leaf hash in hex."""
    return {
        "sequence": record.sequence,
        "record_time": timestamp(record.record_time_us),
        "event_time": timestamp(record.time_us),
        "event_id": record.event_id,
        "recorder": record.recorder,
        "principal": record.principal,
        "account_id": record.account_id,
        "api_key_id": record.api_key_id,
        "caller": record.caller,
        "source_ip": record.source_ip,
        "method": record.method,
        "resource": record.resource,
        "action": record.action,
        "outcome": record.outcome,
        "status_code": record.status_code,
        "quota_decision": record.quota_decision,
        "risk_decision": record.risk_decision,
        "request_id": record.request_id,
        "trace_id": record.trace_id,
        "latency_us": record.latency_us,
        "clock_sync": record.clock_sync,
        "clock_estimated_error_us": record.clock_estimated_error_us,
        "clock_max_error_us": record.clock_max_error_us,
        "details": dict(sorted(record.details.items())),
        "leaf_hash": record.leaf_hash.hex(),
    }


def csv_lines(records: Iterable[Record], *, header: bool = True) -> Iterable[str]:
    """RFC 4180 CSV, one string per record (each ending in CRLF), the header line first; details as compact
    JSON in its cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)

    def take() -> str:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    if header:
        writer.writerow(COLUMNS)
        yield take()
    for record in records:
        values = row(record)
        values["details"] = json.dumps(values["details"], separators=(",", ":"), ensure_ascii=False)
        writer.writerow([values[c] for c in COLUMNS])
        yield take()


def json_line(record: Record) -> str:
    """The export's row as one JSON line (no newline), keys in COLUMNS order."""
    return json.dumps(row(record), ensure_ascii=False, separators=(",", ":"))

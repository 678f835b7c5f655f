"""tradeguard.audit.siem against the RFCs and specifications, by parsing its own output back with parsers written
here from them: RFC 5424 (header, structured data with its escapes, MSG) in RFC 6587 octet-counted frames, CEF
(header and extension escaping; hypothesis for arbitrary field text), OCSF 1.3.0 (the classes' required
attributes), RFC 4180 CSV and the JSON lines."""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tradeguard.audit import siem
from tradeguard.audit.siem import Record

T0 = 1_795_000_000_123_456  # µs


def record(**fields: Any) -> Record:
    base: dict[str, Any] = {
        "sequence": 42,
        "record_time_us": T0 + 250,
        "recorder": "spiffe://tradeguard.local/trading",
        "event_id": "req-1:audit",
        "time_us": T0,
        "outcome": "OK",
        "method": "/tradeguard.trading.v1.TradingService/PlaceOrder",
        "principal": "alice",
        "account_id": "acct-1",
        "api_key_id": "tgk_abc",
        "caller": "spiffe://tradeguard.local/edge",
        "source_ip": "203.0.113.9",
        "resource": "ord-1",
        "action": "order.place",
        "status_code": "OK",
        "request_id": "r-1",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "latency_us": 1234,
        "details": {"symbol": "ACME"},
        "leaf_hash": bytes(range(32)),
    }
    return Record(**(base | fields))


# --- parsers written from the specifications ------------------------------------------------------------------


def split_cef(line: str) -> tuple[list[str], dict[str, str]]:
    """CEF: seven header fields separated by unescaped `|` (\\| and \\\\ unescaped), then `key=value` pairs where a
    value runs to the next ` key=` with an unescaped `=` (\\=, \\\\, \\n, \\r unescaped)."""
    assert "\n" not in line and "\r" not in line
    header: list[str] = []
    current = ""
    i = 0
    while len(header) < 7:
        c = line[i]
        if c == "\\":
            nxt = line[i + 1]
            current += {"n": "\n", "r": "\r"}.get(nxt, nxt)
            assert nxt in "\\|nr", f"bad header escape \\{nxt}"
            i += 2
            continue
        if c == "|":
            header.append(current)
            current = ""
        else:
            current += c
        i += 1
    extension = line[i:]
    pairs: dict[str, str] = {}
    starts = [
        m for m in re.finditer(r"(?:^| )([A-Za-z0-9]+)=", extension) if not _escaped(extension, m.end() - 1)
    ]
    for n, match in enumerate(starts):
        end = starts[n + 1].start() if n + 1 < len(starts) else len(extension)
        raw = extension[match.end() : end]
        value, j = "", 0
        while j < len(raw):
            if raw[j] == "\\":
                nxt = raw[j + 1]
                assert nxt in "\\=nr", f"bad extension escape \\{nxt}"
                value += {"n": "\n", "r": "\r"}.get(nxt, nxt)
                j += 2
            else:
                assert raw[j] != "=", "unescaped = in a value"
                value += raw[j]
                j += 1
        pairs[match.group(1)] = value
    return header, pairs


def _escaped(text: str, index: int) -> bool:
    backslashes = 0
    while index - 1 - backslashes >= 0 and text[index - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


SYSLOG = re.compile(
    r"<(?P<pri>[0-9]{1,3})>(?P<version>[1-9][0-9]{0,2}) (?P<timestamp>-|\S+) (?P<hostname>[!-~]{1,255}) "
    r"(?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) (?P<rest>.*)",
    re.DOTALL,
)
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")


def parse_syslog(message: str) -> dict[str, Any]:
    """RFC 5424 section 6: the header, STRUCTURED-DATA (elements with SD-PARAMs, `"` `\\` `]` escaped), MSG."""
    match = SYSLOG.fullmatch(message)
    assert match, message
    assert TIMESTAMP.fullmatch(match["timestamp"])
    rest = match["rest"]
    elements: dict[str, dict[str, str]] = {}
    if rest.startswith("-"):
        rest = rest[1:]
    else:
        while rest.startswith("["):
            head = re.match(r"\[([^ =\]\"]{1,32})", rest)
            assert head
            sd_id, i = head.group(1), head.end()
            params: dict[str, str] = {}
            while rest[i] == " ":
                name = re.match(r" ([^ =\]\"]{1,32})=\"", rest[i:])
                assert name
                i += name.end()
                value = ""
                while rest[i] != '"':
                    if rest[i] == "\\" and rest[i + 1] in '"\\]':
                        value += rest[i + 1]
                        i += 2
                    else:
                        assert rest[i] != "]", "an unescaped ] in an SD-PARAM"
                        value += rest[i]
                        i += 1
                params[name.group(1)] = value
                i += 1
            assert rest[i] == "]"
            elements[sd_id] = params
            rest = rest[i + 1 :]
    assert rest == "" or rest.startswith(" ")
    return match.groupdict() | {"sd": elements, "msg": rest[1:]}


def unframe(data: bytes) -> list[str]:
    """RFC 6587 3.4.1 octet counting: MSG-LEN SP SYSLOG-MSG, repeated."""
    messages = []
    while data:
        length, _, data = data.partition(b" ")
        assert length.isdigit() and not length.startswith(b"0")
        messages.append(data[: int(length)].decode("utf-8"))
        data = data[int(length) :]
    return messages


# --- CEF --------------------------------------------------------------------------------------------------------


def test_cef_line_carries_the_event() -> None:
    header, ext = split_cef(siem.cef(record()))
    assert header == [
        "CEF:0",
        "Tradeguard",
        "audit",
        "1",
        "order.place",
        "/tradeguard.trading.v1.TradingService/PlaceOrder",
        "1",
    ]
    assert ext["rt"] == str((T0 + 250) // 1000) and ext["start"] == str(T0 // 1000)
    assert (ext["suser"], ext["src"], ext["act"], ext["outcome"]) == (
        "alice",
        "203.0.113.9",
        "order.place",
        "OK",
    )
    assert (ext["externalId"], ext["cn1Label"], ext["cn1"]) == ("req-1:audit", "sequence", "42")
    assert (ext["cs1Label"], ext["cs1"], ext["cs2Label"], ext["cs2"]) == (
        "accountId",
        "acct-1",
        "apiKeyId",
        "tgk_abc",
    )
    assert ext["cat"] == "api-activity"
    v6 = split_cef(siem.cef(record(source_ip="2001:db8::1", outcome="DENIED_AUTHENTICATION")))
    assert v6[1]["c6a2"] == "2001:db8::1" and "src" not in v6[1] and v6[0][6] == "6"
    assert "src" not in split_cef(siem.cef(record(source_ip="not an ip")))[1]


def test_cef_escaping_by_the_specification() -> None:
    nasty = record(action="a|b\\c", method="x=y|z\nw", principal="eve=1 suser=root\\", resource="r\r\nq")
    line = siem.cef(nasty)
    assert "\n" not in line and "\r" not in line
    assert "a\\|b\\\\c" in line and "x=y\\|z\\nw" in line  # header: | and \ escaped, = not
    assert "suser=eve\\=1 suser\\=root\\\\" in line  # extension: = and \ escaped, | not
    header, ext = split_cef(line)
    assert header[4:6] == ["a|b\\c", "x=y|z\nw"]
    assert ext["suser"] == "eve=1 suser=root\\" and ext["cs3"] == "r\nq" and ext["request"] == "x=y|z\nw"
    assert siem.cef_escape_extension("a|b") == "a|b" and siem.cef_escape_header("a=b") == "a=b"


field_text = st.text(st.characters(codec="utf-8"), max_size=40)


@given(action=field_text, method=field_text, principal=field_text, resource=field_text, status=field_text)
def test_cef_escaping_round_trips_any_text(
    action: str, method: str, principal: str, resource: str, status: str
) -> None:
    line = siem.cef(
        record(action=action, method=method, principal=principal, resource=resource, status_code=status)
    )
    header, ext = split_cef(line)

    def norm(text: str) -> str:  # a CRLF is one line break
        return text.replace("\r\n", "\n")

    assert header[4] == norm(action or "audit")
    assert header[5] == norm(method or action or "audit")
    assert ext.get("suser", "") == norm(principal)
    assert ext.get("cs3", "") == norm(resource)
    assert ext.get("reason", "") == norm(status)


# --- RFC 5424 and RFC 6587 ----------------------------------------------------------------------------------------


def test_syslog_message_by_rfc_5424() -> None:
    event = record(event_id='id"with]and\\', outcome="DENIED_RISK")
    message = siem.syslog(event, siem.cef(event), hostname="host-1.example", procid="4242")
    parsed = parse_syslog(message)
    assert int(parsed["pri"]) == 13 * 8 + 4  # log audit, warning
    assert parsed["version"] == "1"
    assert parsed["timestamp"] == siem.timestamp(T0 + 250) and parsed["timestamp"].endswith(".123706Z")
    assert (parsed["hostname"], parsed["app"], parsed["procid"], parsed["msgid"]) == (
        "host-1.example",
        "tradeguard-audit",
        "4242",
        "api-activity",
    )
    assert parsed["sd"] == {
        "tradeguard@32473": {"sequence": "42", "eventId": 'id"with]and\\', "outcome": "DENIED_RISK"}
    }
    assert parsed["msg"] == siem.cef(event)
    login = parse_syslog(siem.syslog(record(action="login", outcome="OK"), "{}"))
    assert login["msgid"] == "authentication" and login["hostname"] == "-" and int(login["pri"]) == 110


def test_syslog_header_fields_are_printable_ascii() -> None:
    parsed = parse_syslog(siem.syslog(record(), "m", hostname="höst name", procid=""))
    assert parsed["hostname"] == "h_st_name" and parsed["procid"] == "-"


def test_octet_counting_frames_split_back() -> None:
    messages = [
        siem.syslog(record(sequence=i, principal="zoë"), siem.cef(record(sequence=i))) for i in range(3)
    ]
    data = b"".join(siem.frame(m) for m in messages)
    assert unframe(data) == messages
    assert siem.frame("é") == b"2 \xc3\xa9"  # octets, not characters


@given(text=field_text)
def test_structured_data_escaping_round_trips(text: str) -> None:
    parsed = parse_syslog(siem.syslog(record(event_id=text, outcome=text), "msg"))
    assert parsed["sd"]["tradeguard@32473"]["eventId"] == text


# --- OCSF -------------------------------------------------------------------------------------------------------

BASE_REQUIRED = ("activity_id", "category_uid", "class_uid", "metadata", "severity_id", "time", "type_uid")


def test_ocsf_api_activity() -> None:
    event = json.loads(json.dumps(siem.ocsf(record())))
    for attribute in (*BASE_REQUIRED, "actor", "api", "src_endpoint"):
        assert attribute in event, attribute
    assert (event["class_uid"], event["category_uid"], event["activity_id"], event["type_uid"]) == (
        6003,
        6,
        1,
        600301,
    )
    assert event["metadata"]["version"] == "1.3.0" and event["metadata"]["uid"] == "req-1:audit"
    assert event["metadata"]["sequence"] == 42 and event["metadata"]["product"]["vendor_name"] == "Tradeguard"
    assert event["time"] == T0 // 1000 and event["metadata"]["logged_time"] == (T0 + 250) // 1000
    assert event["actor"]["user"] == {"name": "alice", "uid": "alice", "account": {"uid": "acct-1"}}
    assert event["src_endpoint"]["ip"] == "203.0.113.9"
    assert event["api"]["operation"] == "PlaceOrder"
    assert event["api"]["service"]["name"] == "tradeguard.trading.v1.TradingService"
    assert (event["status"], event["status_id"], event["severity_id"]) == ("Success", 1, 1)
    assert event["resources"] == [{"uid": "ord-1"}]
    refused = siem.ocsf(record(outcome="DENIED_QUOTA", quota_decision="refused: orders/per-second"))
    assert (refused["status"], refused["status_id"], refused["status_detail"]) == (
        "Failure",
        2,
        "refused: orders/per-second",
    )


def test_ocsf_authentication() -> None:
    login = siem.ocsf(
        record(
            action="login", method="/tradeguard.auth.v1.AuthService/Login", outcome="DENIED_AUTHENTICATION"
        )
    )
    for attribute in (*BASE_REQUIRED, "user"):
        assert attribute in login, attribute
    assert (login["class_uid"], login["category_uid"], login["activity_id"], login["type_uid"]) == (
        3002,
        3,
        1,
        300201,
    )
    assert login["user"]["name"] == "alice" and login["status_id"] == 2 and login["is_mfa"] is False
    mfa = siem.ocsf(record(action="mfa.verify", method="/tradeguard.auth.v1.AuthService/VerifyTotp"))
    assert mfa["class_uid"] == 3002 and mfa["is_mfa"] is True and mfa["activity_id"] == 6
    assert siem.is_authentication(record(action="", method="/tradeguard.auth.v1.AuthService/Logout"))
    assert not siem.is_authentication(record(action="key.revoke"))


# --- the compliance export ------------------------------------------------------------------------------------


def test_csv_by_rfc_4180() -> None:
    rows = [record(), record(sequence=43, resource='say "hi", then\r\nleave', details={"b": "2", "a": "1"})]
    text = "".join(siem.csv_lines(rows))
    assert text.startswith(",".join(siem.COLUMNS) + "\r\n")
    assert text.endswith("\r\n") and text.count('"say ""hi"", then\r\nleave"') == 1
    parsed = list(csv.reader(io.StringIO(text, newline="")))
    assert parsed[0] == list(siem.COLUMNS) and len(parsed) == 3
    second = dict(zip(siem.COLUMNS, parsed[2], strict=True))
    assert second["resource"] == 'say "hi", then\r\nleave'
    assert second["details"] == '{"a":"1","b":"2"}' and second["sequence"] == "43"
    assert (
        second["event_time"] == "2026-11-18T11:06:40.123456Z"
        and second["leaf_hash"] == bytes(range(32)).hex()
    )


def test_json_lines_have_the_same_columns() -> None:
    line = siem.json_line(record(details={"k": "v"}))
    assert "\n" not in line
    parsed = json.loads(line)
    assert list(parsed) == list(siem.COLUMNS)
    assert parsed["details"] == {"k": "v"} and parsed["latency_us"] == 1234 and parsed["outcome"] == "OK"

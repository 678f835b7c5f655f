"""`tradeguard audit …`: its arguments and key files; the syslog export received by a REAL syslog listener written
here (an asyncio TCP server reading RFC 6587 octet-counted RFC 5424 frames, and the same over TLS 1.3 with a
certificate of the test's dev PKI); and, end to end, the command line run as a process against the real audit
service (in process, as production starts it, over mutual TLS) signing its checkpoints with the real key vault:
query, tail across a restart of the service, export, and `verify` passing on the live log, then failing, naming
the entry, after an attacker with the SQLite file drops the append-only triggers and alters or deletes an entry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.tradeguard.audit.test_siem import parse_syslog, record, split_cef
from tradeguard.audit import siem, tlog
from tradeguard.cli import audit_cmd, main
from tradeguard.cli.common import CliError
from tradeguard.mesh import pki

ROOT = Path(__file__).resolve().parents[3]


# --- arguments and key files ----------------------------------------------------------------------------------------


def test_times_are_rfc_3339_or_ages() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert audit_cmd.time_argument("15m", now=now) == now - timedelta(minutes=15)
    assert audit_cmd.time_argument("7d", now=now) == now - timedelta(days=7)
    assert audit_cmd.time_argument("2026-11-30T10:00:00Z") == datetime(2026, 11, 30, 10, tzinfo=UTC)
    assert audit_cmd.time_argument("2026-11-30T10:00:00") == datetime(2026, 11, 30, 10, tzinfo=UTC)
    assert audit_cmd.time_argument("2026-11-30T11:00:00+01:00") == datetime(2026, 11, 30, 10, tzinfo=UTC)
    with pytest.raises(Exception, match="neither a time"):
        audit_cmd.time_argument("yesterday")


def test_options_are_refused_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, words in (
        (["audit", "tail", "--from", "-1"], "must be 0 or more"),
        (["audit", "query", "--limit", "0"], "must be 1 or more"),
        (["audit", "export", "--since", "1h"], "--until"),
        (["audit", "export", "--since", "1h", "--until", "0s", "--syslog", "nohost"], "is not HOST:PORT"),
        (["audit", "query", "--outcome", "fine"], "invalid choice"),
    ):
        with pytest.raises(SystemExit):
            main.parser().parse_args(argv)
        assert words in capsys.readouterr().err
    args = main.parser().parse_args(["audit", "--as", "monitor", "export", "--since", "1h", "--until", "0s"])
    assert (args.identity, args.format, args.syslog) == ("monitor", "csv", None)
    assert audit_cmd.SyslogTarget("[::1]:6514").host == "::1"


def _ed25519() -> tuple[Ed25519PrivateKey, bytes]:
    key = Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_public_key_files(tmp_path: Path) -> None:
    _key1, raw1 = _ed25519()
    key2, raw2 = _ed25519()
    _, raw3 = _ed25519()
    name = "tradeguard.local/audit"
    encoded = base64.b64encode(bytes([1]) + raw1).decode()
    vkey = f"{name}+{tlog.key_hash(name, raw1).hex()}+{encoded}"
    pem = key2.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    path = tmp_path / "keys"
    path.write_text(f"# the checkpoint key\n{vkey}\n{pem}\n{base64.b64encode(raw3).decode()}\n")
    assert audit_cmd.read_public_keys(path) == [raw2, raw1, raw3]
    bad_hash = vkey.replace(tlog.key_hash(name, raw1).hex(), "00000000")
    for text, words in (
        (bad_hash, "the verifier key's hash does not match its key"),
        ("not a key", ":1: not a note verifier key"),
        ("", "holds no key"),
        ("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----", "not Ed25519"),
    ):
        path.write_text(text)
        with pytest.raises(CliError, match=words):
            audit_cmd.read_public_keys(path)
    with pytest.raises(CliError, match="cannot read it"):
        audit_cmd.read_public_keys(tmp_path / "missing")


# --- a real syslog receiver -------------------------------------------------------------------------------------


@dataclass
class SyslogReceiver:
    """An RFC 6587 octet-counting receiver (TCP, or TLS 1.3 when given a context): every message it read."""

    context: ssl.SSLContext | None = None
    messages: list[str] = field(default_factory=list)
    tls_versions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    port: int = 0

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = writer.get_extra_info("ssl_object")
        if tls is not None:
            self.tls_versions.append(tls.version())
        try:
            while True:
                try:
                    length = await reader.readuntil(b" ")
                except asyncio.IncompleteReadError as end:
                    if end.partial:
                        self.errors.append(f"a partial frame header {end.partial!r}")
                    break
                digits = length[:-1]
                if not digits.isdigit() or digits.startswith(b"0") or len(digits) > 9:
                    self.errors.append(f"not an octet count: {digits!r}")
                    break
                self.messages.append((await reader.readexactly(int(digits))).decode("utf-8"))
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as error:
            self.errors.append(repr(error))
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SyslogReceiver]:
        server = await asyncio.start_server(self._session, "127.0.0.1", 0, ssl=self.context)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self


def receiver_tls(paths: pki.PkiPaths) -> ssl.SSLContext:
    pki.issue(paths, "syslog")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(paths.cert("syslog"), paths.key("syslog"))
    return context


def _frames(count: int) -> list[bytes]:
    out = []
    for i in range(count):
        event = record(sequence=i, principal=f"user {i} | = ]\n", outcome="DENIED_QUOTA" if i % 2 else "OK")
        out.append(siem.frame(siem.syslog(event, siem.cef(event), hostname="exporter")))
    return out


async def test_syslog_over_tcp_reaches_a_real_receiver() -> None:
    async with SyslogReceiver().running() as receiver:
        target = audit_cmd.SyslogTarget(f"127.0.0.1:{receiver.port}")
        assert await audit_cmd.send_syslog(_frames(50), target, None) == 50
        await _until(lambda: len(receiver.messages) == 50)
    assert receiver.errors == [] and receiver.tls_versions == []
    for i, message in enumerate(receiver.messages):
        parsed = parse_syslog(message)
        assert parsed["sd"]["tradeguard@32473"]["sequence"] == str(i)
        assert split_cef(parsed["msg"])[1]["suser"] == f"user {i} | = ]\n"


async def test_syslog_over_tls_1_3_checks_the_receiver(pki_paths: pki.PkiPaths, tmp_path: Path) -> None:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki_paths.ca_bundle))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    async with SyslogReceiver(receiver_tls(pki_paths)).running() as receiver:
        target = audit_cmd.SyslogTarget(f"127.0.0.1:{receiver.port}")
        assert await audit_cmd.send_syslog(_frames(5), target, context, server_name="syslog") == 5
        await _until(lambda: len(receiver.messages) == 5)
        with pytest.raises(
            ssl.SSLCertVerificationError
        ):  # the receiver's certificate does not name 127.0.0.1
            await audit_cmd.send_syslog(_frames(1), target, context)
        other = tmp_path / "other"
        elsewhere = pki.PkiPaths(other)
        pki.init_ca(elsewhere, "elsewhere.test")
        stranger = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(elsewhere.ca_bundle))
        with pytest.raises(ssl.SSLCertVerificationError):  # nor does another CA vouch for it
            await audit_cmd.send_syslog(_frames(1), target, stranger, server_name="syslog")
    assert receiver.tls_versions[0] == "TLSv1.3" and len(receiver.messages) == 5
    assert [parse_syslog(m)["app"] for m in receiver.messages] == ["tradeguard-audit"] * 5


async def _until(condition: Any, within_s: float = 30.0) -> None:
    from tradeguard.testing import eventually

    await eventually(condition, within_s)

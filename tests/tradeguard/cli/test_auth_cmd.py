"""`tradeguard auth …` and the credentials of `tradeguard orders …`, end to end: the real key vault, auth service and
trading service (behind its guard) over mutual TLS, the command line run as a process exactly as a person runs it.

An operator creates a trader and an API key (the secret saved 0600, never printed); orders signed with it (HMAC and
Ed25519) pass for the trader's own account only; the trader enrols TOTP from the printed QR code (decoded by a real
QR reader, the code computed by pyotp), logs in, and orders go with the stored JWT, refreshed once by concurrent
commands when it expires; logout, revocation and rotation take effect; every refusal is one line; what `tradeguard
up` prints for a signed order runs as printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
import pyotp
import pytest
import zxingcpp

from services.trading.service import SERVICE as TRADING
from services.trading.settings import Settings as TradingSettings
from tests.support import PACKAGED_LIMITS, running_ratelimit
from tests.support_auth import printed_commands, real_auth
from tradeguard import registry, signing
from tradeguard.cli.up_cmd import Child, Supervisor
from tradeguard.guard import Guard, GuardSettings
from tradeguard.mesh.server import ServerConfig
from tradeguard.testing import RunningService, dev_pki, eventually, running_service

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
PASSWORD = "a long and private passphrase"
WORKLOADS = ("ops", "auth", "keyvault", "trading", "monitor", "trading-client", "ratelimit")


@dataclass
class Suite:
    home: Path
    env: dict[str, str]
    auth: RunningService[Any, Any]
    trading: RunningService[Any, Any]
    guard: Guard
    password_file: Path

    async def cli(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
        """`tradeguard ARGS…` as a process (the services answer meanwhile: they run on this loop)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tradeguard.cli.main",
            *args,
            env=self.env,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(stdin), 120)
        assert process.returncode is not None
        return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())

    async def ok(self, *args: str) -> str:
        done = await self.cli(*args)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", done.stderr
        return done.stdout

    async def refused(self, *args: str, code: int = 1) -> str:
        """The one line a refused command prints (and nothing on stdout)."""
        done = await self.cli(*args)
        assert done.returncode == code, (done.stdout, done.stderr)
        assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
        return done.stderr

    async def user(self, username: str, account: str, *roles: str) -> str:
        role_args = [arg for role in roles or ("trader",) for arg in ("--role", role)]
        created = json.loads(
            await self.ok(
                *("auth", "user", "create", username, "--account", account, *role_args),
                *("--password-file", str(self.password_file), "--json"),
            )
        )
        return str(created["user"]["user_id"])

    async def key(self, user_id: str, *extra: str) -> str:
        out = await self.ok(
            *("auth", "key", "create", user_id, "--scope", "orders:read", "--scope", "orders:write"),
            *("--ip", "127.0.0.1/32", "--save", "--quiet", *extra),
        )
        return out.strip()


def _env(home: Path, **ports: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEGUARD_")}
    env["PYTHONPATH"] = str(ROOT)
    env["TRADEGUARD_HOME"] = str(home)
    for name, port in ports.items():
        env[f"{registry.env_prefix(name)}_PORT"] = str(port)
    return env


@pytest.fixture
async def suite(tmp_path: Path) -> AsyncIterator[Suite]:
    home = tmp_path / "home"
    paths = dev_pki(home, WORKLOADS)
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    async with real_auth(paths) as real, running_ratelimit(paths, PACKAGED_LIMITS.read_text()) as ratelimit:
        settings = TradingSettings(
            server=ServerConfig(name="trading", port=0, home=home, grace_s=1.0),
            database_url=f"sqlite:///{home / 'data' / 'trading.db'}",
            # the audit stage off: these tests are about the CLI's commands (the stage is tested against the real
            # audit service in tests/tradeguard/guard/test_audit.py)
            guard=GuardSettings(auth_target=real.target, ratelimit_target=ratelimit.target, audit=False),
        )
        async with running_service(TRADING, settings, paths) as trading:
            guard = trading.running.assembly.layers[0]
            assert isinstance(guard, Guard)
            await eventually(lambda: guard.revocations.is_up, 10)
            env = _env(home, auth=real.auth.port, trading=trading.port, keyvault=1)
            yield Suite(home, env, real.auth, trading, guard, password_file)


ORDER = ("--symbol", "BTC-USD", "--side", "buy", "--quantity", "1", "--price", "100")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _text(path: Path) -> str:
    return path.read_text()


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def _ed25519_pair(private: Path, public: Path | None = None) -> None:
    """An Ed25519 key made by openssl as a client would (PEM PKCS#8, 0600), and its public key (PEM)."""
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)], check=True)
    private.chmod(0o600)
    if public is not None:
        subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True)


async def test_an_operator_makes_a_trader_and_a_saved_key_and_orders_are_signed_with_it(suite: Suite) -> None:
    user_id = await suite.user("alice", "acct-alice")
    created = json.loads(
        await suite.ok(
            *("auth", "key", "create", user_id, "--scope", "orders:read", "--scope", "orders:write"),
            *("--ip", "127.0.0.1/32", "--save", "--json"),
        )
    )
    key_id, secret_file = created["key"]["key_id"], Path(created["secret_file"])
    assert created["secret"] == "" and created["key"]["kind"] == "API_KEY_KIND_HMAC"
    assert secret_file == suite.home / "credentials" / f"{key_id}.secret"
    assert _mode(secret_file) == 0o600 and _mode(secret_file.parent) == 0o700
    secret = _text(secret_file)
    assert signing.hmac_secret_valid(secret)  # exactly the secret: no line break, nothing else

    placed = await suite.ok(
        *("orders", "place", "--account", "acct-alice", "--client-order-id", "k-1", *ORDER),
        *("--key-id", key_id, "--secret-file", str(secret_file)),
    )
    order = json.loads(placed)["order"]
    assert (order["account_id"], order["status"]) == ("acct-alice", "ORDER_STATUS_OPEN")
    # the default secret file is the one --save wrote; the account defaults to the key's own
    listed = json.loads(await suite.ok("orders", "--key-id", key_id, "list"))
    assert [o["client_order_id"] for o in listed["orders"]] == ["k-1"]
    assert suite.guard.signed.batcher.batches >= 2  # signed calls, verified by the auth service

    line = await suite.refused(
        *("orders", "place", "--account", "acct-bob", "--client-order-id", "k-2", *ORDER, "--key-id", key_id)
    )
    assert line.startswith("PERMISSION_DENIED: ") and "--account" in line
    # a key without orders:write may read, not trade
    reader = (
        await suite.ok(
            *("auth", "key", "create", user_id, "--scope", "orders:read", "--save", "--quiet", "--days", "1")
        )
    ).strip()
    line = await suite.refused("orders", "place", "--client-order-id", "k-3", *ORDER, "--key-id", reader)
    assert line.startswith("PERMISSION_DENIED: ")

    listing = await suite.ok("auth", "key", "list", user_id)
    assert key_id in listing and reader in listing and secret not in listing
    assert "127.0.0.1/32" in listing and "active" in listing

    await suite.ok("auth", "key", "revoke", key_id)
    await eventually(lambda: suite.guard.revocations.key_revoked(key_id), 5)
    line = await suite.refused("orders", "list", "--key-id", key_id)
    assert line.startswith("UNAUTHENTICATED: ") and "tradeguard auth key list" in line
    assert "REVOKED" in json.dumps(json.loads(await suite.ok("auth", "key", "list", user_id, "--json")))


async def test_a_rotated_key_signs_with_the_saved_new_secret_and_the_old_one_during_its_grace(
    suite: Suite,
) -> None:
    user_id = await suite.user("rita", "acct-rita")
    key_id = await suite.key(user_id)
    old = _text(suite.home / "credentials" / f"{key_id}.secret")
    out = await suite.ok("auth", "key", "rotate", key_id, "--grace-hours", "1", "--save")
    assert "shown nowhere else" in out
    new = _text(suite.home / "credentials" / f"{key_id}.secret")
    assert new != old and signing.hmac_secret_valid(new) and new not in out
    await suite.ok("orders", "list", "--key-id", key_id)  # the new secret
    old_file = suite.home / "old.secret"
    _write(old_file, old)
    await suite.ok("orders", "list", "--key-id", key_id, "--secret-file", str(old_file))  # grace period


async def test_an_ed25519_key_registers_only_the_public_key_and_signs_orders(
    suite: Suite, tmp_path: Path
) -> None:
    user_id = await suite.user("eddie", "acct-eddie")
    private = tmp_path / "eddie.pem"
    public = tmp_path / "eddie.pub"
    await asyncio.to_thread(_ed25519_pair, private, public)
    created = json.loads(
        await suite.ok(
            *("auth", "key", "create", user_id, "--scope", "orders:write", "--scope", "orders:read"),
            *("--ed25519-public-key-file", str(public), "--json"),
        )
    )
    assert created["key"]["kind"] == "API_KEY_KIND_ED25519" and created["secret"] == ""
    key_id = created["key"]["key_id"]
    order = json.loads(
        await suite.ok(
            "orders",
            "place",
            "--client-order-id",
            "ed-1",
            *ORDER,
            "--key-id",
            key_id,
            "--ed25519-key-file",
            str(private),
        )
    )["order"]
    assert order["account_id"] == "acct-eddie"
    line = await suite.refused(
        *(
            "auth",
            "key",
            "create",
            user_id,
            "--scope",
            "orders:read",
            "--ed25519-public-key-file",
            str(public),
        ),
        "--save",
        code=2,
    )
    assert "an Ed25519 key has no secret to save" in line
    other = tmp_path / "other.pem"
    await asyncio.to_thread(_ed25519_pair, other)
    line = await suite.refused("orders", "list", "--key-id", key_id, "--ed25519-key-file", str(other))
    assert line.startswith("UNAUTHENTICATED: ")


def _qr_payload(text: str) -> str:
    """Decode the terminal QR code (Unicode half blocks) with a real QR reader (zxing-cpp)."""
    halves = {"█": (255, 255), "▀": (255, 0), "▄": (0, 255), " ": (0, 0)}
    lines = [line for line in text.splitlines() if line and set(line) <= set(halves)]
    assert lines, "no QR code printed"
    rows: list[list[int]] = []
    for line in lines:
        rows.append([halves[c][0] for c in line])
        rows.append([halves[c][1] for c in line])
    scale = 4
    width = max(len(row) for row in rows) * scale
    image = bytearray()
    for row in rows:
        pixels = b"".join(bytes([value]) * scale for value in row).ljust(width, b"\xff")
        image += pixels * scale
    found = zxingcpp.read_barcodes(memoryview(bytes(image)).cast("B", (len(rows) * scale, width)))
    assert len(found) == 1
    return str(found[0].text)


async def test_totp_enrolment_from_the_qr_code_login_and_orders_with_the_stored_refreshed_token(
    suite: Suite,
) -> None:
    await suite.user("bob", "acct-bob")
    line = await suite.refused("auth", "login", "bob", "--password-file", str(suite.password_file))
    assert "MFA_ENROLLMENT_REQUIRED" in line and "tradeguard auth totp enroll bob" in line

    enrolled = await suite.ok("auth", "totp", "enroll", "bob", "--password-file", str(suite.password_file))
    uri = _qr_payload(enrolled)
    assert uri.startswith("otpauth://totp/") and uri in enrolled.splitlines()
    totp = pyotp.TOTP(parse_qs(urlparse(uri).query)["secret"][0])
    confirmed = await suite.ok(
        "auth", "totp", "confirm", "bob", totp.now(), "--password-file", str(suite.password_file)
    )
    recovery = re.findall(r"^  (\S+)$", confirmed, re.MULTILINE)
    assert len(recovery) >= 8 and "shown only this once" in confirmed

    line = await suite.refused("auth", "login", "bob", "--password-file", str(suite.password_file), code=2)
    assert "add --totp CODE" in line  # no terminal to ask on
    out = await suite.ok(
        "auth",
        "login",
        "bob",
        "--totp",
        totp.at(time.time() + 30),
        "--password-file",
        str(suite.password_file),
    )
    session_file = suite.home / "credentials" / "bob.json"
    stored = json.loads(_text(session_file))
    assert _mode(session_file) == 0o600 and str(session_file) in out
    assert stored["access_token"] not in out and stored["refresh_token"] not in out
    assert stored["workload"] == "ops"

    order = json.loads(
        await suite.ok("orders", "place", "--client-order-id", "jwt-1", *ORDER, "--login", "bob")
    )
    assert order["order"]["account_id"] == "acct-bob"

    # the stored access token expires: two commands at once refresh it once (a second use of the spent refresh
    # token would revoke the whole login), and both go through
    stored["access_expires_at"] = 0
    _write(session_file, json.dumps(stored))
    first, second = await asyncio.gather(
        suite.cli("orders", "list", "--login", "bob"), suite.cli("orders", "--login", "bob", "list")
    )
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    refreshed = json.loads(_text(session_file))
    assert (
        refreshed["refresh_token"] != stored["refresh_token"] and refreshed["access_expires_at"] > time.time()
    )
    await suite.ok("orders", "list", "--login", "bob")  # the login was not revoked by a reuse

    line = await suite.refused("orders", "list", "--login", "bob", "--as", "monitor", code=2)
    assert "bound to the certificate of workload 'ops'" in line

    await suite.ok("auth", "logout", "bob")
    assert not session_file.exists()
    line = await suite.refused("orders", "list", "--login", "bob", code=2)
    assert "not logged in here" in line and "tradeguard auth login bob" in line

    out = await suite.ok(
        "auth",
        "login",
        "bob",
        "--recovery",
        recovery[0],
        "--password-file",
        str(suite.password_file),
        "--json",
    )
    assert json.loads(out)["credentials_file"] == str(session_file)
    await suite.ok("orders", "list", "--login", "bob")
    before = json.loads(_text(session_file))
    assert "refreshes it" in await suite.ok("auth", "refresh", "bob")
    after = json.loads(_text(session_file))
    assert (
        after["refresh_token"] != before["refresh_token"] and after["access_token"] != before["access_token"]
    )
    # revoking the login's family (the fam claim) ends it at the guard, and its refresh is refused
    family = jwt.decode(after["access_token"], options={"verify_signature": False})["fam"]
    await suite.ok("auth", "revoke", "--family", family)
    await eventually(lambda: suite.guard.revocations.token_revoked("", family, "", 0) is not None, 5)
    line = await suite.refused("orders", "list", "--login", "bob")
    assert line.startswith("UNAUTHENTICATED: ")
    line = await suite.refused("auth", "refresh", "bob", code=2)
    assert "has ended" in line and "tradeguard auth login bob" in line
    assert not session_file.exists()
    # a revoked login refuses at the guard, then its refresh ends it
    user_id = json.loads(
        await suite.ok(
            "auth",
            "user",
            "create",
            "carl",
            "--account",
            "acct-carl",
            "--role",
            "viewer",
            "--password-file",
            str(suite.password_file),
            "--json",
        )
    )["user"]["user_id"]
    await suite.ok("auth", "login", "carl", "--password-file", str(suite.password_file))
    await suite.ok("orders", "list", "--login", "carl")
    await suite.ok("auth", "revoke", "--user", user_id)
    await eventually(lambda: suite.guard.revocations.token_revoked("", None, user_id, 0) is not None, 5)
    line = await suite.refused("orders", "list", "--login", "carl")
    assert line.startswith("UNAUTHENTICATED: ") and "tradeguard auth login carl" in line
    line = await suite.refused("orders", "place", "--client-order-id", "v-1", *ORDER, "--login", "carl")
    assert line.startswith(("UNAUTHENTICATED: ", "PERMISSION_DENIED: "))


async def test_users_roles_and_public_keys_as_text_and_json(suite: Suite) -> None:
    user_id = await suite.user("dora", "acct-dora", "viewer")
    shown = await suite.ok("auth", "user", "get", user_id)
    assert "username  dora" in shown and "roles     viewer" in shown
    changed = json.loads(await suite.ok("auth", "user", "roles", user_id, "--role", "trader", "--json"))
    assert changed["user"]["roles"] == ["trader"] and changed["user"]["mfa_required"] is True
    assert json.loads(await suite.ok("auth", "user", "unlock", user_id, "--json")) == {}
    roles = json.loads(await suite.ok("auth", "role", "list", "--json"))["roles"]
    assert {"name": "viewer", "permissions": ["orders:read"]} in roles
    await suite.ok("auth", "role", "set", "auditor", "--permission", "orders:read")
    assert re.search(r"^auditor\s+orders:read$", await suite.ok("auth", "role", "list"), re.MULTILINE)
    jwks = json.loads(await suite.ok("auth", "jwks"))
    assert jwks["keys"] and jwks["keys"][0]["kty"] == "OKP"
    assert (
        await suite.ok(
            "auth",
            "user",
            "create",
            "erin",
            "--account",
            "a",
            "--role",
            "viewer",
            "--password-file",
            str(suite.password_file),
            "--quiet",
        )
        != ""
    )


async def test_refusals_are_one_line_with_the_reason_and_the_field(suite: Suite) -> None:
    user_id = await suite.user("fred", "acct-fred", "viewer")
    line = await suite.refused(
        "auth", "key", "create", user_id, "--scope", "orders:read", "--ip", "10.0.0.1/8", "--save"
    )
    assert line.startswith("INVALID_ARGUMENT: ") and "ip_allow_list" in line
    line = await suite.refused("auth", "key", "create", user_id, "--scope", "orders:write", "--save")
    assert line.startswith("PERMISSION_DENIED: ") and "reason SCOPES_EXCEED_OWNER" in line
    line = await suite.refused(
        "auth",
        "user",
        "create",
        "fred",
        "--account",
        "x",
        "--role",
        "viewer",
        "--password-file",
        str(suite.password_file),
    )
    assert line.startswith("ALREADY_EXISTS: ")
    line = await suite.refused("auth", "user", "get", "usr_nope")
    assert line.startswith("INVALID_ARGUMENT: ") and "user_id: " in line
    line = await suite.refused("auth", "key", "create", user_id, "--scope", "orders:read", "--quiet", code=2)
    assert "add --save" in line
    line = await suite.refused("auth", "user", "get", user_id, "--as", "monitor")
    assert line.startswith("PERMISSION_DENIED: ")
    line = await suite.refused(
        "auth", "user", "create", "../etc", "--account", "a", "--role", "viewer", code=2
    )
    assert "is not a username" in line
    wrong = suite.home / "wrong.password"
    _write(wrong, "not the password\n")
    line = await suite.refused(
        "auth", "login", "fred", "--password-file", str(wrong)
    )  # the one opaque refusal
    assert line.startswith("UNAUTHENTICATED: ") and "wrong username, password or code" in line
    line = await suite.refused("orders", "list", code=2)
    assert "orders need a person's credentials" in line and "tradeguard auth key create" in line


async def test_the_signed_order_tradeguard_up_prints_runs_as_printed(
    suite: Suite, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(
        home=suite.home,
        cert_hours=24.0,
        check_seconds=30.0,
        ready_timeout=60.0,
        stable_seconds=60.0,
        max_fast_crashes=5,
    )
    supervisor = Supervisor(args, services=[])
    for name, port in (("keyvault", 1), ("auth", suite.auth.port), ("trading", suite.trading.port)):
        supervisor.children[name] = Child(registry.lookup(name), port, port + 1)
    supervisor.banner()
    banner = capsys.readouterr().out
    commands = [c for c in printed_commands(banner) if "vault" not in c]
    assert commands[0].startswith("export ") and f"TRADEGUARD_HOME={suite.home}" in commands[0]
    signed = [c for c in commands if "orders place" in c]
    assert signed and "--key-id" in signed[0] and "--secret-file" in signed[0]
    env = {k: v for k, v in suite.env.items() if not k.startswith("TRADEGUARD_")}
    script = "set -euo pipefail\n" + "\n".join(commands) + "\n"
    shell = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        script,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(shell.communicate(), 180)
    assert shell.returncode == 0, err.decode()
    assert '"status": "ORDER_STATUS_OPEN"' in out.decode() and '"account_id": "acct-1"' in out.decode()
    assert _mode(suite.home / "alice.password") == 0o600
    secrets = list((suite.home / "credentials").glob("tgk_*.secret"))
    assert len(secrets) == 1 and _text(secrets[0]) not in out.decode() + err.decode()


def _readme_block(after: str) -> str:
    text = _text(ROOT / "README.md")
    match = re.compile(r"```sh\n(.*?)```", re.S).search(text, text.index(after))
    assert match is not None
    return match.group(1)


async def test_the_readmes_signed_order_and_grpcurl_lines_work_as_written(suite: Suite) -> None:
    """README "Calling it": the trader, the saved key and the signed order with the CLI, then the grpcurl lines
    (signing the protoc-encoded request by hand) with the real grpcurl (.venv/bin/grpcurl)."""
    cli_block = _readme_block("`tradeguard up` prints these commands")
    grpcurl_block = _readme_block("With [grpcurl]")
    env = dict(suite.env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    shell = await asyncio.create_subprocess_exec(
        *("bash", "-euo", "pipefail", "-c", cli_block + grpcurl_block),
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(shell.communicate(), 180)
    assert shell.returncode == 0, err.decode()
    text = out.decode()
    assert '"client_order_id": "demo-1"' in text and '"account_id": "acct-1"' in text  # the CLI's JSON
    assert "tradeguard.trading.v1.TradingService" in text.split()  # grpcurl list
    assert 'client_order_id: "demo-2"' in text and "ORDER_STATUS_OPEN" in text  # grpcurl's text-format answer
    assert 'quantity: "0.5"' in text and 'price: "64000.25"' in text  # the order as signed and sent
    assert _mode(suite.home / "alice.password") == 0o600
    (secret,) = (suite.home / "credentials").glob("tgk_*.secret")
    assert _text(secret) not in text + err.decode()

"""The `tradeguard` command line without a running suite: help, where options may be written, the one-line
errors a newcomer meets, ports from the registry and the environment, and JSON with every field."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import io
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import zxingcpp
from google.protobuf import text_format

from tradeguard import registry, signing
from tradeguard.cli import auth_cmd, common, credentials, main, mesh_call
from tradeguard.cli.mesh_call import to_json
from tradeguard.keyvault.v1 import keyvault_pb2
from tradeguard.mesh import pki
from tradeguard.rpc.status import ErrorInfo, FieldViolation, RichStatus
from tradeguard.trading.v1 import trading_pb2


def _parsers(
    parser: argparse.ArgumentParser, path: str = "tradeguard"
) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _parsers(sub, f"{path} {name}")
    return out


def test_every_command_and_option_is_described_and_shows_its_default() -> None:
    """Newcomer 7: each command has a description, each option and argument a help text, and `--help` shows
    each option's default (argparse printed neither before)."""
    parsers = _parsers(main.parser())
    assert len(parsers) > 15
    for path, parser in parsers:
        assert parser.description, f"{path}: no description"
        assert isinstance(parser.formatter_class, type) and issubclass(
            parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter
        ), path
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):  # each subcommand's line in the list
                for choice in action._choices_actions:
                    assert choice.help, f"{path} {choice.dest}: no help"
                continue
            assert action.help, f"{path}: {action.dest} has no help"
            shown = action.default not in (None, "", argparse.SUPPRESS) and not isinstance(
                action.default, bool
            )
            if shown and action.option_strings:
                assert f"(default: {action.default})" in " ".join(text.split()), f"{path} {action.dest}"
    help_up = " ".join(dict(parsers)["tradeguard up"].format_help().split())
    assert "(default: 24.0)" in help_up and "renews certificates" in help_up


@pytest.mark.parametrize(
    "argv",
    [
        ["vault", "--as", "auth", "encrypt", "credentials"],
        ["vault", "encrypt", "credentials", "--as", "auth"],
        ["vault", "encrypt", "--as=auth", "credentials"],
    ],
)
def test_as_is_accepted_before_or_after_the_action(argv: list[str]) -> None:
    args = main.parser().parse_args(argv)
    assert args.identity == "auth" and args.name == "credentials"


def test_as_defaults_to_ops_and_home_is_accepted_after_the_command(tmp_path: Path) -> None:
    args = main.parser().parse_args(["orders", "list", "--account", "a"])
    assert args.identity == "ops" and args.target is None and args.home is None
    args = main.parser().parse_args(["pki", "status", "--home", str(tmp_path)])
    assert args.home == tmp_path
    args = main.parser().parse_args(["orders", "--target", "h:1", "list", "--account", "a"])
    assert args.target == "h:1"


def test_as_before_the_command_says_where_it_belongs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main.parser().parse_args(["--as", "auth", "vault", "status"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert (
        "--as belongs to a command (auth, orders, vault, quota, audit, kill, alerts)" in err
        and "unrecognized" not in err
    )


def test_an_empty_home_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main.parser().parse_args(["--home", "", "pki", "status"])
    assert "--home: must not be empty" in capsys.readouterr().err


def _one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main.main(list(argv))
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("tradeguard: error: ")
    return captured.err


def test_an_empty_home_says_to_start_the_suite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Newcomer 1: a command against a home with no PKI was a FileNotFoundError traceback."""
    empty = tmp_path / "empty"
    err = _one_line_error(capsys, "--home", str(empty), "orders", "list", "--account", "a")
    assert f"no PKI in {empty.resolve() / 'pki'}: run `tradeguard up`" in err
    err = _one_line_error(capsys, "vault", "status", "--home", str(empty))
    assert "no PKI" in err
    assert not empty.exists()  # nothing was created by a failed call


def test_a_missing_workload_certificate_says_what_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Newcomer 1: the README's `vault --as auth encrypt …` ended in a traceback when pki/auth.crt did not exist."""
    paths = pki.PkiPaths(tmp_path)
    pki.init_ca(paths)
    pki.issue(paths, "ops")
    err = _one_line_error(capsys, "--home", str(tmp_path), "vault", "--as", "auth", "encrypt", "credentials")
    assert (
        f"no certificate for workload 'auth' in {paths.dir.resolve()}: run `tradeguard pki issue auth`" in err
    )
    err = _one_line_error(capsys, "--home", str(tmp_path), "vault", "decrypt", "k", "c", "--as", "Not_A_Name")
    assert "--as 'Not_A_Name': invalid workload name" in err


def test_an_expired_or_mismatched_certificate_says_what_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = pki.PkiPaths(tmp_path)
    pki.init_ca(paths)
    pki.issue(paths, "ops", now=datetime.now(UTC) - timedelta(days=2), lifetime=timedelta(hours=1))
    err = _one_line_error(capsys, "--home", str(tmp_path), "orders", "list", "--account", "a")
    assert "the certificate of workload 'ops' expired at" in err and "tradeguard pki renew ops" in err
    pki.issue(paths, "ops")
    pki.issue(paths, "auth")
    paths.key("ops").write_bytes(paths.key("auth").read_bytes())
    err = _one_line_error(capsys, "--home", str(tmp_path), "orders", "list", "--account", "a")
    assert "the key of workload 'ops' does not match its certificate" in err


def test_ports_come_from_the_registry_and_the_services_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Newcomer 3: the commands read TRADEGUARD_<NAME>_PORT, the variable `make run` sets (they hard-coded
    50055 and 50054 before, as their own copies of the registry's defaults)."""
    for name in registry.SERVICES:
        monkeypatch.delenv(f"{registry.env_prefix(name)}_PORT", raising=False)
        monkeypatch.delenv(f"{registry.env_prefix(name)}_METRICS_PORT", raising=False)
    monkeypatch.delenv("TRADEGUARD_HOST", raising=False)
    assert common.target("trading") == f"127.0.0.1:{registry.lookup('trading').port}"
    assert common.target("keyvault") == f"127.0.0.1:{registry.lookup('keyvault').port}"
    monkeypatch.setenv("TRADEGUARD_TRADING_PORT", "6055")
    monkeypatch.setenv("TRADEGUARD_HOST", "0.0.0.0")
    assert common.target("trading") == "127.0.0.1:6055"
    assert common.metrics_port("trading", 6055) == 7055
    monkeypatch.setenv("TRADEGUARD_TRADING_METRICS_PORT", "9100")
    assert common.metrics_port("trading", 6055) == 9100
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PORT", "70000")
    with pytest.raises(common.CliError, match="TRADEGUARD_KEYVAULT_PORT=70000 is not a port number"):
        common.target("keyvault")
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PORT", "65000")
    with pytest.raises(common.CliError, match="set TRADEGUARD_KEYVAULT_METRICS_PORT"):
        common.metrics_port("keyvault", 65000)


def test_json_output_keeps_default_values() -> None:
    """Newcomer 6: `vault status` printed `{"root_kind": …}` without `sealed` when the vault was unsealed."""
    text = to_json(keyvault_pb2.GetSealStatusResponse(sealed=False, root_kind=keyvault_pb2.ROOT_KIND_LOCAL))
    assert '"sealed": false' in text and '"root_kind": "ROOT_KIND_LOCAL"' in text
    assert '"sealed": false' in to_json(keyvault_pb2.UnsealResponse())


README = Path(__file__).resolve().parents[3] / "README.md"
ROOT = README.parent
PLACE_ORDER = "/tradeguard.trading.v1.TradingService/PlaceOrder"


def readme_block(after: str, language: str = "sh") -> str:
    """The first ```LANGUAGE block of README.md after the line containing `after`."""
    text = README.read_text()
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, text.index(after))
    assert match is not None, f"no {language} block after {after!r}"
    return match.group(1)


def _stand_in(tool: str) -> str:
    """A shell function standing in for `tool`: prints its name, each argument on its own line, then <<end>>."""
    return f'{tool}() {{ printf "%s\\n" "{tool}" "$@"; printf "<<end>>\\n"; }}\n'


def _headers(args: list[str]) -> dict[str, str]:
    pairs = [args[i + 1] for i, a in enumerate(args) if a == "-H"]
    return {name.strip().lower(): value.strip() for name, value in (p.split(":", 1) for p in pairs)}


def _key_and_secret(home: Path) -> tuple[str, str]:
    key_id = signing.new_key_id(os.urandom)
    secret = signing.new_hmac_secret(os.urandom)
    credentials.save_secret(home, key_id, secret)
    return key_id, secret


def _calls(out: str, tool: str) -> list[list[str]]:
    calls: list[list[str]] = []
    current: list[str] | None = None
    for line in out.splitlines():
        if line == tool and current is None:
            current = []
        elif line == "<<end>>" and current is not None:
            calls.append(current)
            current = None
        elif current is not None:
            current.append(line)
    return calls


def test_the_readme_grpcurl_lines_sign_what_grpcurl_sends_and_use_the_ports_and_home_set(
    tmp_path: Path,
) -> None:
    """Run as a shell would (grpcurl replaced by a stand-in that prints its arguments): the lines follow
    TRADEGUARD_TRADING_PORT and TRADEGUARD_HOME, and the x-tg-* headers sign the protobuf bytes of the text-format
    request grpcurl is given (its encoding is protoc's: the real grpcurl runs in test_auth_cmd)."""
    block = readme_block("With [grpcurl]")
    assert not re.search(r":500\d\d", block)
    key_id, secret = _key_and_secret(tmp_path)
    env = {
        "PATH": os.environ["PATH"],
        "TRADEGUARD_TRADING_PORT": "6123",
        "TRADEGUARD_HOME": str(tmp_path),
        "TG_KEY": key_id,
    }
    script = _stand_in("grpcurl") + block.replace(".venv/bin/python", sys.executable)
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    listed, placed = _calls(out, "grpcurl")
    for call in (listed, placed):
        assert call[:6] == [
            "-cacert",
            f"{tmp_path}/pki/ca.crt",
            "-cert",
            f"{tmp_path}/pki/ops.crt",
            "-key",
            f"{tmp_path}/pki/ops.key",
        ]
        assert "127.0.0.1:6123" in call
    assert listed[-1] == "list"
    request_text = placed[placed.index("-d") + 1]
    body = text_format.Parse(request_text, trading_pb2.PlaceOrderRequest()).SerializeToString()
    headers = _headers(placed)
    assert placed[-1] == "tradeguard.trading.v1.TradingService/PlaceOrder"
    assert signing.verify_hmac(
        secret,
        headers["x-tg-signature"],
        key_id,
        signing.parse_timestamp(headers["x-tg-timestamp"]),
        signing.parse_nonce(headers["x-tg-nonce"]),
        PLACE_ORDER,
        signing.body_digest(body),
    )
    assert headers["x-tg-key"] == key_id and secret not in out
    now_ms = time.time_ns() // 1_000_000
    assert abs(int(headers["x-tg-timestamp"]) - now_ms) < 60_000


def test_the_readme_curl_lines_sign_the_body_exactly_as_sent(tmp_path: Path) -> None:
    block = readme_block("through the HTTP edge with curl")
    key_id, secret = _key_and_secret(tmp_path)
    env = {
        "PATH": os.environ["PATH"],
        "TG_KEY": key_id,
        "TG_SECRET_FILE": str(credentials.secret_path(tmp_path, key_id)),
        "TG_EDGE": "https://edge.test:8443",
    }
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _stand_in("curl") + block],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (call,) = _calls(out, "curl")
    assert f"https://edge.test:8443{PLACE_ORDER}" in call
    body = call[call.index("--data-binary") + 1].encode()
    assert json.loads(body)["client_order_id"] == "demo-3"
    headers = _headers(call)
    assert signing.verify_hmac(
        secret,
        headers["x-tg-signature"],
        key_id,
        headers["x-tg-timestamp"],
        signing.parse_nonce(headers["x-tg-nonce"]),
        PLACE_ORDER,
        signing.body_digest(body),
    )
    assert secret not in block and secret not in out


def test_the_readme_python_example_uses_only_the_standard_library_and_matches_the_kit() -> None:
    """The worked example runs in an isolated interpreter (no Tradeguard on the path), prints what the README says it
    prints, and that is what tradeguard.signing computes for the same request."""
    block = readme_block("A worked example", "python")
    shown = readme_block("A worked example", "text")
    assert "tradeguard" not in block.replace("/tradeguard.trading", "")
    run = subprocess.run(
        [sys.executable, "-I", "-c", block], capture_output=True, text=True, check=True, cwd="/"
    )
    assert run.stdout == shown
    names: dict[str, object] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block, "README.md", "exec"), names)
    sign = names["sign"]
    assert callable(sign)
    key_id = signing.new_key_id(os.urandom)
    secret = signing.new_hmac_secret(os.urandom)
    for body, path in ((b"", "/a.B/C"), (b"\x00\xff\n", PLACE_ORDER), ("é".encode(), "/x?y=1&z=%20")):
        expected = dict(
            signing.signed_headers(
                signing.Scheme.HMAC_SHA256, secret, key_id, 1767225600123, "n" * 16, path, body
            )
        )
        assert sign(key_id, secret, path, body, 1767225600123, "n" * 16) == expected
    printed = dict(line.split(": ", 1) for line in shown.splitlines())
    assert printed["x-tg-signature"] == signing.sign_hmac(
        "tgs_7ypgXOF6xofWNE5wneVMD4vmdULC3ulcTKB2tkbSJA1",
        printed["x-tg-key"],
        printed["x-tg-timestamp"],
        printed["x-tg-nonce"],
        PLACE_ORDER,
        signing.body_digest(
            b'{"client_order_id":"demo-3","symbol":"BTC-USD","side":"SIDE_BUY","type":"ORDER_TYPE_LIMIT",'
            b'"quantity":"0.5","price":"64000.25"}'
        ),
    )
    assert signing.key_id_valid(printed["x-tg-key"])  # the example's key id has a valid checksum


# --- tradeguard auth: what needs no running service ------------------------------------------------------------


def test_every_auth_action_prints_json_on_request_and_creating_ones_can_print_only_the_id() -> None:
    parsers = dict(_parsers(main.parser()))
    leaves = [path for path in parsers if path.startswith("tradeguard auth ") and path.count(" ") >= 2]
    leaves = [path for path in leaves if not any(other.startswith(path + " ") for other in parsers)]
    assert len(leaves) == 17, leaves
    for path in leaves:
        options = {o for action in parsers[path]._actions for o in action.option_strings}
        assert "--json" in options and "--as" in options and "--home" in options, path
    assert "--quiet" in {o for a in parsers["tradeguard auth key create"]._actions for o in a.option_strings}
    assert "--quiet" in {o for a in parsers["tradeguard auth user create"]._actions for o in a.option_strings}
    for path in leaves:  # no option takes a password, secret or token on the command line
        options = {o for action in parsers[path]._actions for o in action.option_strings}
        assert not {o for o in options if re.search("password|secret|token", o)} - {"--password-file"}, path


def test_auth_options_are_accepted_before_or_after_the_action_and_factors_exclude_each_other(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = main.parser().parse_args(["auth", "--as", "trading-client", "login", "alice", "--totp", "123456"])
    assert (args.identity, args.username, args.totp, args.recovery) == (
        "trading-client",
        "alice",
        "123456",
        None,
    )
    args = main.parser().parse_args(["auth", "login", "alice", "--recovery"])
    assert args.recovery == "" and args.identity == "ops"  # asked on the terminal
    with pytest.raises(SystemExit):
        main.parser().parse_args(["auth", "login", "alice", "--totp", "1", "--recovery", "x"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main.parser().parse_args(["auth", "key", "create", "usr_x"])  # a key without a scope
    assert "--scope" in capsys.readouterr().err
    args = main.parser().parse_args(["auth", "revoke", "--family", "f1", "--target", "h:1"])
    assert (args.family, args.jti, args.user, args.target) == ("f1", None, None, "h:1")
    # a random id may begin with "-" (one in 64): still the option's value (it failed CI once: "expected one argument")
    args = main.parser().parse_args(
        ["auth", "revoke", "--family", "-UfTcRXxV0-yue5aehmRhQ", "--target", "h:1"]
    )
    assert (args.family, args.target) == ("-UfTcRXxV0-yue5aehmRhQ", "h:1")
    args = main.parser().parse_args(["auth", "revoke", "--jti", "--Yq3_x-2Fw0AbCdEfGhIjKl"])
    assert args.jti == "--Yq3_x-2Fw0AbCdEfGhIjKl"
    with pytest.raises(
        SystemExit
    ):  # a forgotten value is still an error, not the next option taken as the id
        main.parser().parse_args(["auth", "revoke", "--family", "--target", "h:1"])
    assert "expected one argument" in capsys.readouterr().err


def test_the_totp_qr_code_reads_back_as_the_uri_with_a_real_qr_reader() -> None:
    uri = "otpauth://totp/Tradeguard:alice?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP&issuer=Tradeguard"
    text = auth_cmd.qr_text(uri)
    assert (
        set(text) <= set("█▀▄ \n") and max(len(line) for line in text.splitlines()) <= 80
    )  # fits a terminal
    halves = {"█": (255, 255), "▀": (255, 0), "▄": (0, 255), " ": (0, 0)}
    rows = [[halves[c][half] for c in line] for line in text.splitlines() for half in (0, 1)]
    scale = 4
    image = b"".join(b"".join(bytes([v]) * scale for v in row) * scale for row in rows)
    found = zxingcpp.read_barcodes(memoryview(image).cast("B", (len(rows) * scale, len(rows[0]) * scale)))
    assert [barcode.text for barcode in found] == [uri]


def test_secrets_and_sessions_are_written_0600_in_a_0700_directory_atomically(tmp_path: Path) -> None:
    (tmp_path / "credentials").mkdir(mode=0o755)
    (tmp_path / "credentials").chmod(0o755)
    key_id = signing.new_key_id(os.urandom)
    secret = signing.new_hmac_secret(os.urandom)
    path = credentials.save_secret(tmp_path, key_id, secret)
    assert path == tmp_path / "credentials" / f"{key_id}.secret"
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)  # tightened
    assert path.read_text() == secret  # the secret alone: what an HMAC key is made of
    assert credentials.read_secret_file(str(path)) == secret
    session = credentials.Session("alice", "ops", "eyJ.access", "refresh-xyz", 1000.0, 2000.0)
    saved = credentials.save_session(tmp_path, session)
    assert saved.stat().st_mode & 0o777 == 0o600 and credentials.load_session(tmp_path, "alice") == session
    assert "eyJ.access" not in repr(session) and "refresh-xyz" not in repr(session)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [path.name, saved.name]
    )  # no temporary left
    assert session.access_fresh(1000.0 - credentials.REFRESH_MARGIN_S - 1)
    assert not session.access_fresh(1000.0 - credentials.REFRESH_MARGIN_S)
    with pytest.raises(common.CliError, match="is not an API key id"):
        credentials.secret_path(
            tmp_path, "tgk_" + "A" * 38
        )  # the checksum is checked before any path is made
    with pytest.raises(common.CliError, match="is not a username"):
        credentials.session_path(tmp_path, "../pki/ops")


def test_credential_files_are_checked_and_never_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("tgs_short\n")
    wrong.chmod(0o600)
    with pytest.raises(common.CliError) as refused:
        credentials.read_secret_file(str(wrong))
    assert "does not hold an API key secret" in str(refused.value) and "tgs_short" not in str(refused.value)
    password = tmp_path / "password"
    password.write_text("first line \nsecond\n")
    password.chmod(0o644)
    assert credentials.read_password_file(str(password)) == "first line "
    assert "readable by others: chmod 600" in capsys.readouterr().err
    password.write_text("\n")
    with pytest.raises(common.CliError, match="is empty"):
        credentials.read_password_file(str(password))
    with pytest.raises(common.CliError, match="cannot read the password file"):
        credentials.read_password_file(str(tmp_path / "missing"))
    pem = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "ed25519"], capture_output=True, check=True
    ).stdout
    private = tmp_path / "key.pem"
    private.write_bytes(pem)
    private.chmod(0o600)
    public = tmp_path / "key.pub"
    public.write_bytes(
        subprocess.run(["openssl", "pkey", "-pubout"], input=pem, capture_output=True, check=True).stdout
    )
    seed = credentials.read_ed25519_private_key(str(private))
    assert signing.ed25519_public_key(seed) == credentials.read_ed25519_public_key(str(public))
    with pytest.raises(common.CliError, match="not a PEM Ed25519 public key"):
        credentials.read_ed25519_public_key(str(private))  # a private key is never sent
    ec = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        capture_output=True,
        check=True,
    ).stdout
    private.write_bytes(ec)
    with pytest.raises(common.CliError, match="not an Ed25519 private key"):
        credentials.read_ed25519_private_key(str(private))


def test_a_new_password_is_asked_twice_and_never_taken_without_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = argparse.Namespace(password_file=None)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    with pytest.raises(common.CliError, match="give --password-file"):
        auth_cmd._password(args, new=True)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    answers = iter(["one", "two"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt: next(answers))
    with pytest.raises(common.CliError, match="the two passwords differ"):
        auth_cmd._password(args, new=True)
    answers = iter(["same", "same"])
    assert auth_cmd._password(args, new=True) == "same"


def test_a_refusal_is_one_printable_line_with_its_reason_and_fields() -> None:
    status = RichStatus(
        code=grpc.StatusCode.INVALID_ARGUMENT,
        message="bad\nrequest\x1b[31m",
        error_info=ErrorInfo("USERNAME_INVALID", "tradeguard"),
        field_violations=(FieldViolation("username", "3-64 letters"), FieldViolation("roles", "unknown: x")),
    )
    line = mesh_call.describe(status)
    assert (
        line
        == "INVALID_ARGUMENT: bad request [31m (reason USERNAME_INVALID; username: 3-64 letters; roles: unknown: x)"
    )
    plain = RichStatus(
        code=grpc.StatusCode.UNAUTHENTICATED,
        message="authentication failed",
        error_info=ErrorInfo("UNAUTHENTICATED", "d"),
    )
    assert mesh_call.describe(plain) == "UNAUTHENTICATED: authentication failed"


async def test_a_fresh_login_is_used_without_a_call_and_an_ended_one_says_to_log_in(tmp_path: Path) -> None:
    session = credentials.Session("alice", "ops", "access", "refresh", 1000.0, 2000.0)
    credentials.save_session(tmp_path, session)
    # no PKI, no service: a fresh token needs neither
    assert await auth_cmd.fresh_session(tmp_path, "alice", "ops", clock=lambda: 900.0) == session
    with pytest.raises(common.CliError, match=r"bound to the certificate of workload 'ops'.*use --as ops"):
        await auth_cmd.fresh_session(tmp_path, "alice", "monitor", clock=lambda: 900.0)
    with pytest.raises(auth_cmd.SessionEnded, match="has expired: run `tradeguard auth login alice`"):
        await auth_cmd.fresh_session(tmp_path, "alice", "ops", clock=lambda: 2000.0)
    with pytest.raises(common.CliError, match="'bob' is not logged in here"):
        await auth_cmd.fresh_session(tmp_path, "bob", "ops")
    (tmp_path / "credentials" / "alice.json").write_text("{not json")
    with pytest.raises(common.CliError, match="unreadable: run `tradeguard auth login alice` again"):
        await auth_cmd.fresh_session(tmp_path, "alice", "ops")

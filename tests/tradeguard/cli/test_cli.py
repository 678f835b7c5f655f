"""The `tradeguard` command line without a running suite: help, where options may be written, the one-line
errors a newcomer meets, ports from the registry and the environment, and JSON with every field."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tradeguard import registry
from tradeguard.cli import common, main
from tradeguard.cli.mesh_call import to_json
from tradeguard.keyvault.v1 import keyvault_pb2
from tradeguard.mesh import pki


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
    assert "--as belongs to a command (auth, orders, vault)" in err and "unrecognized" not in err


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


def test_the_readme_grpcurl_lines_use_the_ports_and_home_set(tmp_path: Path) -> None:
    """Newcomer 3: the README's grpcurl lines hard-coded 127.0.0.1:50055 and .tradeguard/pki. Run as a shell
    would (grpcurl replaced by echo), they follow TRADEGUARD_TRADING_PORT and TRADEGUARD_HOME, and fall back to
    the registry's defaults."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.DOTALL)
    (block,) = [b for b in blocks if "grpcurl " in b]
    assert not re.search(r":500\d\d", block)
    script = block.replace("grpcurl ", "echo grpcurl ")
    env = {"PATH": os.environ["PATH"], "TRADEGUARD_TRADING_PORT": "6123", "TRADEGUARD_HOME": str(tmp_path)}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.count("echo") == 0 and out.count("grpcurl ") == 2 and out.count("127.0.0.1:6123 ") == 2
    assert out.count(f"-cacert {tmp_path}/pki/ca.crt -cert {tmp_path}/pki/ops.crt") == 2
    env = {"PATH": os.environ["PATH"]}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert "-cacert .tradeguard/pki/ca.crt" in out
    assert f"127.0.0.1:{registry.lookup('trading').port} list" in out

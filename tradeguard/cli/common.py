"""What the `tradeguard` commands share: the one error a user sees, where the suite listens, whose certificate
a command presents, and the options every command accepts wherever they are written.

Ports and names come from the registry (`tradeguard.registry`) and the same environment the services read
(`TRADEGUARD_<NAME>_PORT`, `TRADEGUARD_<NAME>_METRICS_PORT`, `TRADEGUARD_HOST`, `TRADEGUARD_HOME`), so the
commands `tradeguard up` prints reach the ports it started the services on.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tradeguard import registry
from tradeguard.mesh import pki, tls

__all__ = [
    "DEFAULT_HOME",
    "OPERATOR",
    "CliError",
    "HelpFormatter",
    "add_home_option",
    "add_identity_options",
    "connect_host",
    "home",
    "host",
    "metrics_port",
    "service_command",
    "service_port",
    "target",
    "workload",
]

OPERATOR = "ops"  # the operators' workload identity: the CLI's default
DEFAULT_HOME = Path(".tradeguard")


class CliError(Exception):
    """A failure the user can act on: `tradeguard` prints its one line (no traceback) and exits 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default shown after its help (unless it has none); descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "") or isinstance(action.default, bool):
            return action.help  # "(default: None)" says nothing (the help says what happens then); a flag's help says what it turns on
        return super()._get_help_string(action)


# --- where the suite lives and listens ------------------------------------------------------------------------


def _home_argument(value: str) -> Path:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty (the suite's state directory)")
    return Path(value)


def home(given: Path | None) -> Path:
    """`--home`, else $TRADEGUARD_HOME (when set and not empty), else ./.tradeguard; absolute."""
    if given is not None:
        return given.resolve()
    raw = os.environ.get("TRADEGUARD_HOME", "").strip()
    return (Path(raw) if raw else DEFAULT_HOME).resolve()


def _env_port(variable: str, default: int) -> int:
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise CliError(f"{variable}={raw!r} is not a port number (1-65535)") from None
    if not 1 <= value <= 65535:
        raise CliError(f"{variable}={value} is not a port number (1-65535)")
    return value


def service_port(name: str) -> int:
    """TRADEGUARD_<NAME>_PORT, else the registry's default port."""
    return _env_port(f"{registry.env_prefix(name)}_PORT", registry.lookup(name).port)


def metrics_port(name: str, port: int) -> int:
    """TRADEGUARD_<NAME>_METRICS_PORT, else the service port + 1000 (Prometheus, loopback only)."""
    default = port + 1000
    variable = f"{registry.env_prefix(name)}_METRICS_PORT"
    if default > 65535 and not os.environ.get(variable, "").strip():
        raise CliError(
            f"{name}'s metrics port would be {default} ({registry.env_prefix(name)}_PORT={port} + 1000): "
            f"set {variable}"
        )
    return _env_port(variable, default)


def host() -> str:
    """TRADEGUARD_HOST: the address the services bind (default 127.0.0.1)."""
    return os.environ.get("TRADEGUARD_HOST", "").strip() or "127.0.0.1"


def connect_host() -> str:
    """Where a local client connects: the bound address, or loopback when the services bind every address."""
    bound = host()
    return "127.0.0.1" if bound in ("0.0.0.0", "::", "[::]") else bound  # noqa: S104 - compared, not bound


def target(name: str) -> str:
    """host:port of a local service, from the same environment the service reads."""
    bound = connect_host()
    shown = f"[{bound}]" if ":" in bound and not bound.startswith("[") else bound
    return f"{shown}:{service_port(name)}"


# --- whose certificate a command presents ---------------------------------------------------------------------


def workload(home_dir: Path, name: str) -> tls.Workload:
    """The files of workload `name` under `home_dir`, checked: a missing PKI, certificate or key, an expired or
    mismatched certificate is a CliError saying what to run, never a traceback."""
    paths = pki.PkiPaths(home_dir)
    try:
        paths.cert(name)
    except ValueError as error:
        raise CliError(f"--as {name!r}: {error}") from None
    if not paths.ca_bundle.is_file():
        raise CliError(
            f"no PKI in {paths.dir}: run `tradeguard up` (or `tradeguard pki init`), "
            "or point --home / TRADEGUARD_HOME at the suite's home"
        )
    if not paths.cert(name).is_file() or not paths.key(name).is_file():
        raise CliError(
            f"no certificate for workload {name!r} in {paths.dir}: run `tradeguard pki issue {name}`"
        )
    files = tls.Workload.of(paths, name)
    try:
        info = pki.read_cert_info(files.cert, name)
        material = files.read()
    except (OSError, ValueError) as error:
        raise CliError(
            f"cannot read the certificate of workload {name!r} ({error}): run `tradeguard pki issue {name}`"
        ) from None
    if material is None:
        raise CliError(
            f"the key of workload {name!r} does not match its certificate in {paths.dir}: "
            f"run `tradeguard pki issue {name}`"
        )
    if info.expired(datetime.now(UTC)):
        raise CliError(
            f"the certificate of workload {name!r} expired at {info.not_after:%Y-%m-%d %H:%M:%S}Z: "
            f"run `tradeguard pki renew {name}` (a running `tradeguard up` renews its own)"
        )
    return files


# --- options accepted wherever they are written ---------------------------------------------------------------


def add_home_option(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """`--home` on the top-level parser and, repeated, on every subcommand (`tradeguard pki status --home X`
    means the same as `tradeguard --home X pki status`); the later one wins."""
    parser.add_argument(
        "--home",
        type=_home_argument,
        default=None if top else argparse.SUPPRESS,
        metavar="DIR",
        help="the suite's state directory (PKI, data): default $TRADEGUARD_HOME, else ./.tradeguard",
    )


def add_identity_options(parser: argparse.ArgumentParser, service: str, *, top: bool = False) -> None:
    """`--as` and `--target` on a service's command (`top`) and, repeated, on each of its actions, so that
    `tradeguard vault --as auth encrypt K` and `tradeguard vault encrypt K --as auth` both work."""
    variable = f"{registry.env_prefix(service)}_PORT"
    parser.add_argument(
        "--as",
        dest="identity",
        metavar="WORKLOAD",
        default=OPERATOR if top else argparse.SUPPRESS,
        help=f"the workload certificate to present ($TRADEGUARD_HOME/pki/WORKLOAD.crt); "
        f"the {service} service's policy decides what it may do" + ("" if top else f" (default: {OPERATOR})"),
    )
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=None if top else argparse.SUPPRESS,
        help=f"where the {service} service listens: default $TRADEGUARD_HOST (or 127.0.0.1):${variable} "
        f"(or {registry.lookup(service).port})",
    )


def service_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    description: str | None,
    *,
    service: str,
    run: Callable[[argparse.Namespace], int],
    options: Callable[..., None] | None = None,
) -> Callable[[str, str], argparse.ArgumentParser]:
    """A service's command (`tradeguard <name> ACTION`, run by `run(args)`) with `--as`, `--target` and `--home` on
    it and on each of its actions — and `options(parser, top=...)` too when given (e.g. the credentials of a
    guarded call) — ; returns `action(name, help)`, which adds an action (its parser, for its own arguments)."""
    command = subparsers.add_parser(
        name, help=help_text, description=description, formatter_class=HelpFormatter
    )
    command.set_defaults(func=run)
    add_identity_options(command, service, top=True)
    if options is not None:
        options(command, top=True)
    add_home_option(command)
    actions = command.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(action_name: str, action_help: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(
            action_name, help=action_help, description=action_help, formatter_class=HelpFormatter
        )
        add_identity_options(parser, service)
        if options is not None:
            options(parser)
        add_home_option(parser)
        return parser

    return action

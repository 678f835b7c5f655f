"""The `tradeguard` command line: `pki`, `up`, `orders`, `vault`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import tradeguard  # noqa: F401  (sets the TLS 1.3-only grpc setting before grpc is imported)
from tradeguard.cli import orders_cmd, pki_cmd, up_cmd, vault_cmd
from tradeguard.mesh.server import home_from_env


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="tradeguard", description=__doc__)
    root.add_argument(
        "--home",
        type=Path,
        default=None,
        help="state directory (PKI, data); default $TRADEGUARD_HOME or ./.tradeguard",
    )
    sub = root.add_subparsers(dest="command", required=True)
    pki_cmd.register(sub)
    up_cmd.register(sub)
    orders_cmd.register(sub)
    vault_cmd.register(sub)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.home = (args.home or home_from_env()).resolve()
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

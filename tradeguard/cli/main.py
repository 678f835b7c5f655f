"""The `tradeguard` command line: `pki`, `up`, `auth`, `orders`, `vault`, `quota`, `audit`, `edge`, `kill`,
`alerts`.

Every command reads the suite's home (--home, else $TRADEGUARD_HOME, else ./.tradeguard) and the services'
ports from the same environment the services read (TRADEGUARD_<SERVICE>_PORT). `tradeguard COMMAND --help`
describes each command.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

import tradeguard  # noqa: F401  (sets the TLS 1.3-only grpc setting before grpc is imported)
from tradeguard.cli import (
    alerts_cmd,
    audit_cmd,
    auth_cmd,
    common,
    edge_cmd,
    kill_cmd,
    orders_cmd,
    pki_cmd,
    quota_cmd,
    up_cmd,
    vault_cmd,
)

_SCOPED_IN = "auth, orders, vault, quota, audit, kill, alerts"
# Options whose values are random base64url ids (a token's jti, a login's family): one in 64 begins with "-",
# which argparse would take for an option ("expected one argument").
_OPAQUE_ID_OPTIONS = frozenset({"--jti", "--family"})
_OPTION_WORD = re.compile(r"-h|--[a-z][a-z-]*")
_SCOPED = {"--as": _SCOPED_IN, "--target": _SCOPED_IN}


class _Parser(argparse.ArgumentParser):
    """Names the command an option belongs to when it is written before the command (`tradeguard --as auth
    vault …`), instead of argparse's "unrecognized arguments"."""

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        argv = _joined_opaque_ids(list(sys.argv[1:] if args is None else args))
        commands = set(_COMMANDS)
        for word in argv:
            if word in commands:
                break
            option = word.split("=", 1)[0]
            if option in _SCOPED:
                self.error(
                    f"{option} belongs to a command ({_SCOPED[option]}): write it after the command, "
                    f"e.g. `tradeguard vault {option} … ACTION` or `tradeguard vault ACTION … {option} …`"
                )
        return super().parse_args(argv, namespace)


def _joined_opaque_ids(argv: list[str]) -> list[str]:
    """`--family -Uf…` as `--family=-Uf…`: an id after an id option is its value even when it begins with "-"
    (unless it is an option word, as when the value was forgotten: then argparse says so)."""
    out: list[str] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        following = argv[index + 1] if index + 1 < len(argv) else None
        if (
            word in _OPAQUE_ID_OPTIONS
            and following is not None
            and following.startswith("-")
            and not _OPTION_WORD.fullmatch(following)
        ):
            out.append(f"{word}={following}")
            index += 2
            continue
        out.append(word)
        index += 1
    return out


_COMMANDS = ("pki", "up", "auth", "orders", "vault", "quota", "audit", "edge", "kill", "alerts")


def parser() -> argparse.ArgumentParser:
    root = _Parser(prog="tradeguard", description=__doc__, formatter_class=common.HelpFormatter)
    common.add_home_option(root, top=True)
    sub = root.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=argparse.ArgumentParser
    )
    pki_cmd.register(sub)
    up_cmd.register(sub)
    auth_cmd.register(sub)
    orders_cmd.register(sub)
    vault_cmd.register(sub)
    quota_cmd.register(sub)
    audit_cmd.register(sub)
    edge_cmd.register(sub)
    kill_cmd.register(sub)
    alerts_cmd.register(sub)
    assert tuple(sub.choices) == _COMMANDS
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.home = common.home(args.home)
        code: int = args.func(args)
    except common.CliError as error:
        print(f"tradeguard: error: {error}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())

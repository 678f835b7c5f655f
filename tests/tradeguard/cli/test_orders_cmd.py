"""`tradeguard orders` credentials without a running service: which credential the options name, where they may be
written, and the one line a contradictory or missing choice gets (saying what to run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tradeguard import signing
from tradeguard.cli import common, credentials, main, orders_cmd
from tradeguard.mesh import pki


def _key(home: Path) -> tuple[str, str]:
    key_id = signing.new_key_id(os.urandom)
    secret = signing.new_hmac_secret(os.urandom)
    credentials.save_secret(home, key_id, secret)
    return key_id, secret


def test_credential_options_are_accepted_before_or_after_the_action(tmp_path: Path) -> None:
    for argv in (
        ["--key-id", "K", "list"],
        ["list", "--key-id", "K"],
        ["--login", "alice", "get", "--order-id", "o"],
        ["get", "--order-id", "o", "--login", "alice"],
    ):
        args = main.parser().parse_args(["orders", *argv])
        assert (args.key_id, args.login) in (("K", None), (None, "alice"))
    args = main.parser().parse_args(["orders", "list"])
    assert (args.key_id, args.secret_file, args.ed25519_key_file, args.login, args.account) == (None,) * 4 + (
        "",
    )
    args = main.parser().parse_args(
        ["orders", "list", "--account", "acct-1"]
    )  # the existing flag still works
    assert args.account == "acct-1"


def test_an_api_key_reads_its_saved_secret_by_default(tmp_path: Path) -> None:
    key_id, secret = _key(tmp_path)
    args = main.parser().parse_args(["orders", "list", "--key-id", key_id])
    args.home = tmp_path
    key = orders_cmd.api_key(args)
    assert key is not None and (key.key_id, key.secret, key.ed25519_seed) == (key_id, secret, None)
    assert secret not in repr(key)
    other = tmp_path / "elsewhere.secret"
    other.write_text(signing.new_hmac_secret(os.urandom) + "\n")
    other.chmod(0o600)
    args = main.parser().parse_args(["orders", "--secret-file", str(other), "list", "--key-id", key_id])
    args.home = tmp_path
    key = orders_cmd.api_key(args)
    assert key is not None and key.secret == other.read_text().strip()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--secret-file", "F"], "add --key-id KEY_ID"),
        (["--key-id", "{key}", "--login", "alice"], "two credentials: give one"),
        (["--key-id", "{key}", "--secret-file", "a", "--ed25519-key-file", "b"], "give one of the files"),
        (["--key-id", "{missing}"], "no secret for"),
        (["--key-id", "tgk_" + "A" * 38, "--secret-file", "{file}"], "not an API key id"),
    ],
)
def test_a_contradictory_or_missing_credential_is_one_line(
    tmp_path: Path, argv: list[str], expected: str
) -> None:
    key_id, _ = _key(tmp_path)
    missing = signing.new_key_id(os.urandom)
    filled = [
        a.format(key=key_id, missing=missing, file=credentials.secret_path(tmp_path, key_id)) for a in argv
    ]
    args = main.parser().parse_args(["orders", "list", *filled])
    args.home = tmp_path
    with pytest.raises(common.CliError, match=expected):
        orders_cmd.api_key(args)


def test_orders_without_credentials_say_what_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = pki.PkiPaths(tmp_path)
    pki.init_ca(paths)
    pki.issue(paths, "ops")
    code = main.main(["--home", str(tmp_path), "orders", "list", "--account", "acct-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "orders need a person's credentials" in err
    assert "tradeguard auth key create USER_ID" in err and "tradeguard auth login USERNAME" in err
    code = main.main(["--home", str(tmp_path), "orders", "list", "--login", "alice"])
    err = capsys.readouterr().err
    assert code == 2 and "'alice' is not logged in here" in err and "tradeguard auth login alice" in err

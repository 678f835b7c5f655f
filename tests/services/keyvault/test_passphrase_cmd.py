"""`python -m services.keyvault change-passphrase`, driven through stdin as a script would."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from services.keyvault import passphrase_cmd
from services.keyvault.root import LocalSealedRoot, WrongPassphrase

OLD, NEW = "0ld-secret-phrase-1", "n3w-secret-phrase-2"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    LocalSealedRoot.create(tmp_path / "data" / "keyvault.root", OLD, scrypt_n=2**10)
    return tmp_path


def _run(home: Path, stdin: str, *argv: str) -> int:
    env = {"TRADEGUARD_HOME": str(home), "TRADEGUARD_KEYVAULT_SCRYPT_N": str(2**10)}
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        return passphrase_cmd.main(list(argv), env)
    finally:
        sys.stdin = saved


def test_changes_the_passphrase_and_updates_the_startup_file(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    startup = home / "data" / "dev-vault-passphrase"
    assert _run(home, f"{OLD}\n{NEW}\n", "--update-file", str(startup)) == 0
    assert "sealed under the new passphrase" in capsys.readouterr().out
    LocalSealedRoot.unseal(home / "data" / "keyvault.root", NEW)
    with pytest.raises(WrongPassphrase):
        LocalSealedRoot.unseal(home / "data" / "keyvault.root", OLD)
    assert startup.read_text() == NEW + "\n" and oct(startup.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(
    ("stdin", "code", "message"),
    [
        (f"not it\n{NEW}\n", 1, "does not unseal"),
        (f"{OLD}\nshort\n", 2, "at least 12 characters"),
        (f"{OLD}\n{OLD}\n", 2, "is the current one"),
    ],
)
def test_refusals_leave_the_root_as_it_was(
    home: Path, capsys: pytest.CaptureFixture[str], stdin: str, code: int, message: str
) -> None:
    assert _run(home, stdin) == code
    err = capsys.readouterr().err
    assert message in err and NEW not in err and OLD not in err  # passphrases never echoed
    LocalSealedRoot.unseal(home / "data" / "keyvault.root", OLD)


def test_missing_root_and_the_module_entry_point(tmp_path: Path) -> None:
    assert _run(tmp_path, f"{OLD}\n{NEW}\n") == 2
    result = subprocess.run(
        [sys.executable, "-m", "services.keyvault", "change-passphrase", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "--update-file" in result.stdout

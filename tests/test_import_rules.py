"""The import rules of pyproject.toml's [tool.importlinter] bite: `lint-imports` (run by `make lint`) passes on the
tree as it is and fails, naming the contract, when one forbidden import is added to a copy of the tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

LAYERS = "services stand on the kit: tradeguard never imports services"
INDEPENDENT = "services never import each other (they talk over the mesh)"
PURE = "cores and other pure modules import no grpc, protobuf, database driver or Redis"
HAZMAT = "only the key vault's primitives use cryptography.hazmat for data"
CONTRACTS = (LAYERS, INDEPENDENT, PURE, HAZMAT)


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("tradeguard", "services"):
        shutil.copytree(ROOT / package, tree / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # Run from the copy: lint-imports puts its working directory first on sys.path, so the copy is analysed.
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _verdicts(output: str) -> dict[str, str]:
    """Contract name → KEPT or BROKEN, from the summary (a long name may wrap onto the next line)."""
    text = " ".join(output.split())
    verdicts = {}
    for name in CONTRACTS:
        start = text.find(name)
        assert start >= 0, f"contract {name!r} not in the output:\n{output}"
        rest = text[start + len(name) :]
        kept, broken = rest.find("KEPT"), rest.find("BROKEN")
        candidates = [(i, v) for i, v in ((kept, "KEPT"), (broken, "BROKEN")) if i >= 0]
        verdicts[name] = min(candidates)[1]
    return verdicts


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = _lint(_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert _verdicts(result.stdout) == dict.fromkeys(CONTRACTS, "KEPT")
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("tradeguard/cli/orders_cmd.py", "import services.trading.model", LAYERS),
        ("tradeguard/cli/main.py", "from services.keyvault import core", LAYERS),
        ("services/trading/servicer.py", "from services.keyvault.model import KeyType", INDEPENDENT),
        ("services/keyvault/key_use.py", "import services.trading.core", INDEPENDENT),
        ("services/trading/core.py", "import grpc", PURE),
        ("services/trading/model.py", "from google.protobuf import timestamp_pb2", PURE),
        ("services/keyvault/core.py", "import psycopg", PURE),
        ("services/keyvault/secret_store.py", "import sqlite3", PURE),
        ("services/keyvault/model.py", "import redis", PURE),
        ("services/keyvault/sealing.py", "from google.rpc import status_pb2", PURE),
        ("tradeguard/errors.py", "import grpc", PURE),
        ("services/trading/core.py", "import services.trading.store_sqlite", PURE),  # a driver, indirectly
        ("services/keyvault/keyring.py", "from cryptography.hazmat.primitives import hashes", HAZMAT),
        ("tradeguard/files.py", "from cryptography.hazmat.primitives.ciphers.aead import AESGCM", HAZMAT),
        ("services/trading/core.py", "import cryptography.hazmat.primitives.hmac", HAZMAT),
    ],
)
def test_one_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    tree = _tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # the forbidden import under test\n")
    result = _lint(tree)
    assert result.returncode != 0, result.stdout + result.stderr
    verdicts = _verdicts(result.stdout)
    assert verdicts[contract] == "BROKEN", result.stdout
    # Only that contract: the others are still kept, so each failure names the rule that was broken.
    assert {name for name, verdict in verdicts.items() if verdict == "BROKEN"} == {contract}, result.stdout

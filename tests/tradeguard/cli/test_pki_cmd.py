"""``tradeguard pki`` through its register()/func, as the main parser will call it."""

from __future__ import annotations

import argparse
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tradeguard.cli import pki_cmd
from tradeguard.mesh import pki


def _run(home: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tradeguard")
    parser.add_argument("--home", type=Path, default=home)
    pki_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    result: int = args.func(args)
    return result


def test_init_issue_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path, "pki", "init", "--trust-domain", "corp.example") == 0
    assert "created CA for trust domain corp.example" in capsys.readouterr().out
    assert _run(tmp_path, "pki", "init") == 0  # keeps the existing trust domain
    assert "already exists" in capsys.readouterr().out

    assert _run(tmp_path, "pki", "issue", "auth") == 0
    out = capsys.readouterr().out
    assert "spiffe://corp.example/svc/auth" in out
    assert _run(tmp_path, "pki", "issue", "audit", "--hours", "2") == 0
    capsys.readouterr()
    paths = pki.PkiPaths(tmp_path)
    pki.issue(paths, "old", now=datetime.now(UTC) - timedelta(days=2), lifetime=timedelta(hours=1))
    pki.issue(paths, "aging", now=datetime.now(UTC) - timedelta(hours=13))

    assert _run(tmp_path, "pki", "status") == 0
    header, rows = _table(capsys.readouterr().out)
    assert header == ["NAME", "SPIFFE ID", "NOT AFTER (UTC)", "REMAINING", "STATE", "WHY"]
    assert set(rows) == {"root-ca", "intermediate-ca", "auth", "audit", "old", "aging"}
    assert rows["old"]["STATE"] == "EXPIRED"
    assert rows["aging"]["STATE"] == "RENEW" and rows["aging"]["WHY"] == "past half its lifetime"
    assert rows["auth"]["STATE"] == "ok" and rows["auth"]["SPIFFE ID"] == "spiffe://corp.example/svc/auth"
    assert rows["root-ca"]["SPIFFE ID"] == "-" and rows["root-ca"]["STATE"] == "ok"
    assert list(rows)[:2] == ["old", "audit"]  # soonest expiry first


def _table(out: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """`pki status`'s columns, cut where the header's titles start."""
    lines = out.splitlines()
    titles = re.findall(r"\S+(?: \S+)*", lines[0])
    starts = [lines[0].index(title) for title in titles]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows[cells[0]] = dict(zip(titles, cells, strict=True))
    return titles, rows


def test_status_says_renew_for_certificates_an_intermediate_rotation_made_due(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Newcomer 6: after `pki rotate-intermediate`, `pki status` said `ok` for every workload certificate,
    although each was due (issued by the old intermediate) and the next renewal replaced it."""
    assert _run(tmp_path, "pki", "init") == 0
    assert _run(tmp_path, "pki", "issue", "auth") == 0
    assert _run(tmp_path, "pki", "issue", "edge") == 0
    assert _run(tmp_path, "pki", "rotate-intermediate") == 0
    assert _run(tmp_path, "pki", "issue", "edge") == 0  # re-issued under the new intermediate
    capsys.readouterr()
    assert _run(tmp_path, "pki", "status") == 0
    _, rows = _table(capsys.readouterr().out)
    assert rows["auth"]["STATE"] == "RENEW"
    assert rows["auth"]["WHY"] == "not issued by the current intermediate CA"
    assert rows["edge"]["STATE"] == "ok" and rows["intermediate-ca"]["STATE"] == "ok"
    assert _run(tmp_path, "pki", "renew", "auth") == 0
    capsys.readouterr()
    assert _run(tmp_path, "pki", "status") == 0
    assert _table(capsys.readouterr().out)[1]["auth"]["STATE"] == "ok"


def test_status_says_renew_for_a_due_intermediate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki.init_ca(pki.PkiPaths(tmp_path), now=datetime.now(UTC) - timedelta(days=250))
    assert _run(tmp_path, "pki", "status") == 0
    row = _table(capsys.readouterr().out)[1]["intermediate-ca"]
    assert row["STATE"] == "RENEW" and "tradeguard pki rotate-intermediate" in row["WHY"]


def test_errors_go_to_stderr_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path, "pki", "issue", "auth") == 2
    assert "tradeguard pki init" in capsys.readouterr().err
    assert _run(tmp_path, "pki", "status") == 2
    assert _run(tmp_path, "pki", "init", "--trust-domain", "Bad_Domain") == 2
    assert "invalid trust domain" in capsys.readouterr().err
    assert _run(tmp_path, "pki", "init") == 0
    assert _run(tmp_path, "pki", "issue", "Bad") == 2
    assert "invalid workload name 'Bad'" in capsys.readouterr().err
    assert _run(tmp_path, "pki", "issue", "auth", "--hours", "0") == 2
    os.chmod(pki.PkiPaths(tmp_path).intermediate_key, 0o644)
    capsys.readouterr()
    assert _run(tmp_path, "pki", "issue", "auth") == 2
    assert "refusing to load CA key" in capsys.readouterr().err


def test_renew_reissues_only_what_is_due(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`pki renew` (for the Envoy edge, run from a timer): past half-life or missing is re-issued, fresh is kept."""
    assert _run(tmp_path, "pki", "init") == 0
    paths = pki.PkiPaths(tmp_path)
    pki.issue(paths, "edge", now=datetime.now(UTC) - timedelta(hours=13))  # past half of 24 h
    pki.issue(paths, "ops")
    fresh = paths.cert("ops").read_bytes()
    aging = paths.cert("edge").read_bytes()
    capsys.readouterr()
    assert _run(tmp_path, "pki", "renew", "edge", "ops", "monitor") == 0
    assert capsys.readouterr().out.splitlines() == [
        "edge: renewed",
        "ops: still fresh",
        "monitor: renewed",
        f"edge bundle published in {paths.edge_dir}/current",  # what the Envoy edge reads (deploy/README.md)
    ]
    assert paths.cert("ops").read_bytes() == fresh
    assert paths.cert("edge").read_bytes() != aging
    assert not pki.needs_renewal(paths, "edge") and not pki.needs_renewal(paths, "monitor")
    assert _run(tmp_path, "pki", "renew", "edge", "--hours", "-1") == 2
    assert "--hours must be positive" in capsys.readouterr().err

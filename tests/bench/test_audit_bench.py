"""The audit benchmark (bench/audit.py) runs end to end with tiny settings: the key vault and the audit service start
as processes, every mode runs on SQLite (and on the machine's PostgreSQL when it answers: required when
TRADEGUARD_TEST_PG_DSN is set, as in CI) with no error, every append a new entry, and the report is printed with
the aims beside the figures; then the trading call runs without and with the guard's audit stage (every
call of the audited mode recorded through AppendBatch, no error). No timing is asserted: CI proves the benchmark still works, not how fast."""

from __future__ import annotations

import os

import pytest

from bench import audit
from tests.support import PG_DSN

pytestmark = pytest.mark.slow


async def test_the_audit_benchmark_runs_every_mode_on_each_backend(
    capsys: pytest.CaptureFixture[str],
) -> None:
    results = await audit.run(
        concurrency=4, duration=0.3, rounds=1, batches=(10,), batch_callers=2, pg=PG_DSN
    )
    out = capsys.readouterr().out
    if os.environ.get("TRADEGUARD_TEST_PG_DSN"):
        assert "postgres" in results, out
    if "postgres" not in results:
        assert "PostgreSQL: not measured: unreachable" in out
    trading = results.pop("trading")
    assert set(results) <= {"sqlite", "postgres"} and "sqlite" in results
    for backend, modes in results.items():
        assert set(modes) == {"health", "read", "append-1", "append-N", "batch-10"}, backend
        for mode, rounds in modes.items():
            (only,) = rounds
            assert only.result.calls > 0 and only.result.errors == 0, (backend, mode)
            expected = {"health": 0, "read": 0, "append-1": 1, "append-N": 1, "batch-10": 10}[mode]
            assert only.events == only.result.calls * expected, (backend, mode)
            assert only.audit_us > 0, (backend, mode)
        for label in ("health", "read", "append-1", "append-4", "batch-10"):
            assert f"audit-{backend} round 1 {label} " in out
        section = out.split(f"audit-{backend} (median of rounds):", 1)[1]
        for ratio in ("read / health", "append-4 / health", "append-4 / read"):
            assert f"    {ratio} " in section
        assert "aim: 5,000 unary appends/s at 64 writers:" in section
        assert "aim: 50,000 events/s through AppendBatch:" in section
        assert "RSS MiB of the audit process before -> after the load:" in section
    assert "SQLite: " in out

    # the trading call without and with the guard's audit stage
    assert set(trading) == {"jwt", "jwt+audit"}
    for mode, rounds in trading.items():
        (only,) = rounds
        assert only.result.calls > 0 and only.result.errors == 0, mode
        assert set(only.cpu_us) == {"client", "trading", "auth", "audit"}, mode
        assert f"round 1 {mode} " in out
    assert trading["jwt"][0].batch is None  # its guard records nothing
    recorded = trading["jwt+audit"][0].batch
    assert recorded is not None and recorded >= 1  # every call's event through the guard's AppendBatch calls
    assert "jwt+audit / jwt = " in out and "CPU per call, the client and every service:" in out
    assert "trading-jwt+audit " in out.rpartition("RSS MiB before -> after the load:")[2]

"""The guard benchmark (bench/guard.py) and the trading mTLS benchmark run end to end with tiny settings: every
process starts, every mode's calls pass (no errors), the signed modes' calls go through VerifySignedRequests
batches, and the report is printed. No timing is asserted: CI proves the benchmarks still work, not how fast."""

from __future__ import annotations

import pytest

from bench import guard, trading_mtls

pytestmark = pytest.mark.slow


async def test_the_guard_benchmark_runs_every_mode_through_the_real_services(
    capsys: pytest.CaptureFixture[str],
) -> None:
    results = await guard.run(concurrency=4, duration=0.3, rounds=1)
    assert set(results) == set(guard.MODES)
    for mode, rounds in results.items():
        (only,) = rounds
        assert only.result.calls > 0, mode
        assert only.result.errors == 0, mode
        assert set(only.cpu_us) == {"client", "trading", "auth", "keyvault", "ratelimit"}
        if mode in guard.SIGNED:
            assert only.batch is not None and only.batch >= 1, mode  # auth verified them in batches
        else:
            assert only.batch is None, mode  # no signed request reached auth
    out = capsys.readouterr().out
    assert "against no guard" in out
    for mode in guard.MODES:
        assert f"round 1 {mode}" in out
    assert "RSS MiB before -> after the load" in out
    assert "the quota stage: jwt+quota / jwt" in out
    assert "the quota stage: hmac+quota / hmac" in out
    for process in ("keyvault", "auth", "ratelimit", *(f"trading-{mode}" for mode in guard.MODES)):
        assert f"{process} " in out.rpartition("RSS MiB")[2]


async def test_the_mtls_benchmark_runs_its_unguarded_modes(capsys: pytest.CaptureFixture[str]) -> None:
    await trading_mtls.run(concurrency=4, duration=0.3, rounds=1)
    out = capsys.readouterr().out
    for mode in ("plain", "mtls", "mesh"):
        (line,) = [line for line in out.splitlines() if line.startswith(f"round 1 {mode} ")]
        words = line.split()
        assert words[4] == "calls/s" and float(words[3]) > 0, line
        assert "errors 0" in line, line

"""The full-chain benchmark (bench/full_chain.py): how a profiled stack is charged to a stage, and the whole run end
to end with tiny settings (every process starts, every mode's calls pass, the guarded modes' calls go through
quota and audit batches, the stage table and the open loop are printed). No timing is asserted."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from bench import full_chain


def test_a_sample_goes_to_the_innermost_frame_of_a_stage() -> None:
    handler = "TradingServicer.PlaceOrder (services/trading/servicer.py:60)"
    chain = "wrap_handler.<locals>.unary (tradeguard/rpc/handlers.py:101)"
    quota = "QuotaStage.check_batch (tradeguard/guard/quota.py:173)"
    batcher = "Batcher._drain (tradeguard/batching.py:158)"
    channel = "_Rebinding.__call__ (tradeguard/mesh/channel.py:50)"
    grpc_frame = "UnaryUnaryCall._invoke (grpc/aio/_call.py:595)"
    loop = "BaseEventLoop._run_once (asyncio/base_events.py:1922)"
    assert full_chain.stage_of([loop, chain, handler, "sqlite3_step (libsqlite3.so)"]) == "handler+store"
    assert full_chain.stage_of([loop, chain]) == "chain"
    # an outgoing batch RPC is the stage's that makes it, not the batcher's, the channel's or gRPC's
    assert full_chain.stage_of([loop, batcher, quota, channel, grpc_frame]) == "quota"
    assert full_chain.stage_of([loop, batcher]) == "batcher"
    assert full_chain.stage_of([loop, channel]) == "mesh channel (client)"
    assert full_chain.stage_of([loop, channel, grpc_frame]) == "gRPC (Python/Cython)"
    assert full_chain.stage_of([loop, grpc_frame, "sendmsg (libc.so.6)"]) == "gRPC (Python/Cython)"
    assert full_chain.stage_of([loop]) == "event loop"
    assert full_chain.stage_of(["main (x.py:1)"]) == "other"


def test_samples_are_counted_per_stage_from_py_spys_raw_lines() -> None:
    raw = (
        "run (asyncio/base_events.py:1);verify (tradeguard/guard/jwt.py:265) 7\n"
        "run (asyncio/base_events.py:1) 3\n"
        "not a sample line\n"
    )
    assert full_chain.stages_of(raw) == {"authentication": 7, "event loop": 3}


@pytest.mark.slow
async def test_the_full_chain_benchmark_runs_every_mode_through_the_real_services(
    capsys: pytest.CaptureFixture[str],
) -> None:
    profiled = shutil.which("py-spy") is not None or Path(sys.executable).with_name("py-spy").exists()
    results = await full_chain.run(
        concurrency=4, duration=0.5, rounds=1, open_duration=0.5, profiled=profiled
    )
    assert set(results) == set(full_chain.MODES)
    for mode, rounds in results.items():
        (only,) = rounds
        assert only.result.calls > 0, mode
        assert only.result.errors == 0, mode
        assert {"client", "trading", "auth", "ratelimit", "audit", "keyvault"} <= set(only.cpu_us), mode
        if mode == "bare":
            assert "ratelimit" not in only.batches and "audit" not in only.batches, (
                mode
            )  # nothing reached them
        else:
            assert only.batches["ratelimit"] >= 1 and only.batches["audit"] >= 1, mode
    assert results["hmac"][0].batches["auth"] >= 1  # signed calls verified by auth in batches
    out = capsys.readouterr().out
    assert "against the bare call" in out
    for mode in full_chain.MODES:
        assert f"round 1 {mode}" in out
    for mode in full_chain.GUARDED:
        assert f"open loop {mode}" in out
    if profiled:
        assert "where the CPU of one call goes" in out
    assert "RSS MiB before -> after the load" in out

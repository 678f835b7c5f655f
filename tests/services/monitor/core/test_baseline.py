"""The rate_spike detector on synthetic streams (event time is the clock): silent through warm-up, silent for
traffic within its own noise, a spike raised by the very event that crosses the limit, once per bucket, with a
stable id; the limit's boundary (hypothesis); memory bounded by max_subjects."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from services.monitor.core.baseline import RateSpikes
from services.monitor.core.config import RateConfig, Rule
from services.monitor.model import ActionKind, AuditEvent, Finding, Severity
from tests.services.monitor.conftest import event

BUCKET_S = 10


def config(**overrides: object) -> RateConfig:
    values: dict[str, object] = {
        "enabled": True,
        "bucket_us": BUCKET_S * 1_000_000,
        "alpha": 0.1,
        "warmup_buckets": 10,
        "sigmas": 6.0,
        "max_subjects": 1000,
        "subjects": {
            "api_key": Rule(threshold=20, severity=Severity.CRITICAL, actions=(ActionKind.REVOKE_KEY,))
        },
    }
    values.update(overrides)
    return RateConfig(**values)  # type: ignore[arg-type]


def traffic(counts: list[int], key: str = "k1", first_sequence: int = 0) -> list[AuditEvent]:
    """`counts[i]` events in bucket i, spread evenly inside it."""
    events: list[AuditEvent] = []
    sequence = first_sequence
    for bucket, count in enumerate(counts):
        for i in range(count):
            events.append(
                event(sequence, bucket * BUCKET_S + (i + 0.5) * BUCKET_S / (count + 1), api_key_id=key)
            )
            sequence += 1
    return events


def run(detector: RateSpikes, events: list[AuditEvent]) -> list[tuple[int, Finding]]:
    return [(e.sequence, f) for e in events for f in detector.observe(e)]


def test_a_steady_key_then_a_spike_alerts_at_the_crossing_event_once() -> None:
    detector = RateSpikes(config())
    steady = traffic([5] * 30)
    assert run(detector, steady) == []
    spike = traffic([0] * 30 + [200], first_sequence=len(steady))[0:]
    found = run(detector, spike)
    assert len(found) == 1  # once per bucket, however far the count goes
    sequence, finding = found[0]
    assert finding.detector == "rate_spike" and finding.subject == "k1"
    # crossed at the first count above both the threshold (20) and mean + 6 x max(spread, sqrt(mean), 1)
    mean = float(finding.evidence["mean"])
    limit = mean + 6 * max(float(finding.evidence["spread"]), math.sqrt(mean), 1.0)
    assert int(finding.evidence["count"]) == max(20, math.floor(limit) + 1)
    assert sequence == spike[int(finding.evidence["count"]) - 1].sequence
    assert finding.window_us == spike[0].time_us // 10_000_000 * 10_000_000
    assert finding.actions == (ActionKind.REVOKE_KEY,)


def test_the_same_events_read_again_make_the_same_alert_id() -> None:
    events = traffic([5] * 30 + [100])
    ids = []
    for _ in range(2):
        detector = RateSpikes(config())
        ids.append([f.alert_id for e in events for f in detector.observe(e)])
    assert ids[0] == ids[1] and len(ids[0]) == 1


def test_no_alert_during_warm_up_whatever_the_count() -> None:
    detector = RateSpikes(config(warmup_buckets=10))
    assert run(detector, traffic([1] * 5 + [500])) == []


@settings(max_examples=60, deadline=None)
@given(
    mean=st.integers(min_value=1, max_value=40),
    jitter=st.lists(st.floats(min_value=-3, max_value=3), min_size=40, max_size=80),
)
def test_traffic_within_three_sigma_of_its_rate_never_alerts(mean: int, jitter: list[float]) -> None:
    counts = [max(0, round(mean + j * math.sqrt(mean))) for j in jitter]
    assert run(RateSpikes(config()), traffic(counts)) == []


@settings(max_examples=60, deadline=None)
@given(level=st.integers(min_value=0, max_value=60), extra=st.integers(min_value=-3, max_value=3))
def test_the_limit_is_exact(level: int, extra: int) -> None:
    """After a perfectly steady history of `level` per bucket (mean = level, spread 0), a bucket alerts iff its
    count exceeds both the threshold and level + 6 x max(sqrt(level), 1)."""
    limit = level + 6 * max(math.sqrt(level), 1.0)
    count = max(0, math.floor(limit) + extra)
    found = run(RateSpikes(config()), traffic([level] * 15 + [count]))
    expected = count > limit and count >= 20
    assert bool(found) == expected


def test_an_idle_gap_decays_the_baseline() -> None:
    detector = RateSpikes(config(warmup_buckets=5))
    busy = traffic([50] * 20)
    assert run(detector, busy) == []
    # 2,000 idle buckets (over MAX_GAP_BUCKETS): the baseline is back to nothing, 50 is a spike now
    later = [event(len(busy) + i, 2020 * BUCKET_S + i * 0.1, api_key_id="k1") for i in range(50)]
    assert len(run(detector, later)) == 1


def test_subjects_are_bounded_least_recently_seen_forgotten() -> None:
    detector = RateSpikes(config(max_subjects=10))
    for i in range(1000):
        detector.observe(event(i, i * 0.01, api_key_id=f"key-{i}"))
    assert detector.tracked() == 10


def test_events_without_the_subject_or_disabled_are_ignored() -> None:
    detector = RateSpikes(config(enabled=False))
    assert run(detector, traffic([5] * 20 + [300])) == []
    detector = RateSpikes(config())
    assert run(detector, [event(i, i * 0.01) for i in range(500)]) == []  # no api key on the events
    assert detector.tracked() == 0

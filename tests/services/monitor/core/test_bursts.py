"""The burst detectors on synthetic streams: auth_failures raised by the event completing `threshold` refusals
within the window (checked against a reference over random times, hypothesis), per key, account, source address
and principal; login and edge refusals count like the guard's; permission_scan counts distinct methods;
risk_rejections asks for the kill switch at its scope; other outcomes ignored; memory bounded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.monitor.core.bursts import AUTH_FAILURES, PERMISSION_SCAN, RISK_REJECTIONS, Bursts
from services.monitor.core.config import BurstConfig, Rule
from services.monitor.model import ActionKind, Finding, Outcome, Severity
from tests.services.monitor.conftest import START_US, event

DENIED = Outcome.DENIED_AUTHENTICATION


def config(
    threshold: int = 5, window_s: int = 60, kinds: tuple[str, ...] = ("api_key",), **rule: object
) -> BurstConfig:
    return BurstConfig(
        enabled=True,
        window_us=window_s * 1_000_000,
        max_subjects=1000,
        subjects={kind: Rule(threshold=threshold, **rule) for kind in kinds},  # type: ignore[arg-type]
    )


def first_burst(times: list[int], threshold: int, window_us: int) -> int | None:
    """Reference: the index of the first event that ends `threshold` events within `window_us`."""
    for i in range(threshold - 1, len(times)):
        if times[i] - times[i - threshold + 1] <= window_us:
            return i
    return None


@settings(max_examples=150, deadline=None)
@given(
    gaps=st.lists(st.integers(min_value=0, max_value=30_000_000), min_size=1, max_size=40),
    threshold=st.integers(min_value=1, max_value=8),
)
def test_the_first_alert_is_the_event_completing_a_burst(gaps: list[int], threshold: int) -> None:
    detector = Bursts(AUTH_FAILURES, config(threshold=threshold))
    times, now = [], 0
    for gap in gaps:
        now += gap
        times.append(now)
    alerts = [
        (i, f)
        for i, t in enumerate(times)
        for f in detector.observe(event(i, t / 1_000_000, DENIED, api_key_id="k1"))
    ]
    expected = first_burst(times, threshold, 60_000_000)
    if expected is None:
        assert alerts == []
    else:
        assert alerts and alerts[0][0] == expected
        finding = alerts[0][1]
        assert finding.window_us == START_US + times[expected - threshold + 1]  # the burst's first event
        assert int(finding.evidence["count"]) == threshold


def test_one_alert_per_window_while_a_burst_goes_on() -> None:
    detector = Bursts(AUTH_FAILURES, config(threshold=5, window_s=60))
    found = [
        f for i in range(300) for f in detector.observe(event(i, i, DENIED, api_key_id="k1"))
    ]  # 1/s, 5 min
    # quiet for a window after each burst's first event: alerts at 4, 60, 116, 172, 228 and 284 s
    assert [(f.event_time_us - START_US) // 1_000_000 for f in found] == [4, 60, 116, 172, 228, 284]
    assert len({f.alert_id for f in found}) == 6


def test_each_subject_kind_counts_on_its_own() -> None:
    detector = Bursts(
        AUTH_FAILURES, config(threshold=3, kinds=("api_key", "account", "source_ip", "principal"))
    )
    found: list[Finding] = []
    # three different keys of one account from one address: the account and the address alert, no key does
    for i in range(3):
        found += detector.observe(
            event(
                i,
                i,
                DENIED,
                api_key_id=f"k{i}",
                account_id="acct-1",
                source_ip="192.0.2.9",
                principal=f"u{i}",
            )
        )
    assert sorted((f.subject_kind, f.subject) for f in found) == [
        ("account", "acct-1"),
        ("source_ip", "192.0.2.9"),
    ]


def test_login_and_edge_refusals_count_like_the_guards() -> None:
    detector = Bursts(AUTH_FAILURES, config(threshold=4, kinds=("principal", "source_ip")))
    stream = [
        event(
            0,
            0,
            DENIED,
            action="login",
            principal="alice",
            source_ip="192.0.2.1",
            details={"cause": "password"},
        ),
        event(1, 1, DENIED, action="login", principal="alice", source_ip="192.0.2.1"),
        event(2, 2, DENIED, action="edge.authorize", source_ip="192.0.2.1", api_key_id="tgk_x"),
        event(3, 3, DENIED, method="/tradeguard.trading.v1.TradingService/PlaceOrder", source_ip="192.0.2.1"),
    ]
    found = [f for e in stream for f in detector.observe(e)]
    assert [(f.subject_kind, f.subject) for f in found] == [("source_ip", "192.0.2.1")]
    assert found[0].sequences == (0, 1, 2, 3)


def test_other_outcomes_are_not_counted() -> None:
    detector = Bursts(AUTH_FAILURES, config(threshold=2))
    for outcome in Outcome:
        if outcome is not DENIED:
            assert detector.observe(event(0, 0, outcome, api_key_id="k1")) == []
            assert detector.observe(event(1, 0.1, outcome, api_key_id="k1")) == []


def test_permission_scan_counts_distinct_methods() -> None:
    detector = Bursts(PERMISSION_SCAN, config(threshold=4, window_s=300))
    denied = Outcome.DENIED_PERMISSION
    # the same method refused again and again is not a scan
    assert [
        f for i in range(50) for f in detector.observe(event(i, i, denied, api_key_id="k1", method="/a/One"))
    ] == []
    found = [
        f
        for i, method in enumerate(["/a/Two", "/a/Three", "/a/Four"])
        for f in detector.observe(event(100 + i, 60 + i, denied, api_key_id="k1", method=method))
    ]
    assert len(found) == 1
    assert found[0].evidence["methods"] == "/a/Four,/a/One,/a/Three,/a/Two"


def test_risk_rejections_ask_for_the_kill_switch_at_their_scope() -> None:
    rule = Rule(3, Severity.CRITICAL, (ActionKind.NOTIFY, ActionKind.KILL_SWITCH), "api_key")
    detector = Bursts(RISK_REJECTIONS, BurstConfig(True, 60_000_000, 1000, {"api_key": rule}))
    found = [
        f
        for i in range(3)
        for f in detector.observe(event(i, i, Outcome.DENIED_RISK, api_key_id="k1", account_id="acct-1"))
    ]
    assert len(found) == 1
    assert (
        found[0].actions == (ActionKind.NOTIFY, ActionKind.KILL_SWITCH) and found[0].kill_scope == "api_key"
    )
    assert (found[0].api_key_id, found[0].account_id) == ("k1", "acct-1")


def test_a_flood_of_distinct_addresses_is_bounded() -> None:
    detector = Bursts(AUTH_FAILURES, BurstConfig(True, 60_000_000, 100, {"source_ip": Rule(threshold=5)}))
    for i in range(10_000):
        detector.observe(event(i, i * 0.001, DENIED, source_ip=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"))
    assert detector.tracked() == 100

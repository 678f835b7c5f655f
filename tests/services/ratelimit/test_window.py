"""The sliding-window arithmetic (window.py) against an exact sliding log.

An exact sliding log remembers every admitted (time, units) and allows a request when the units in (t - W, t] plus
its own fit the count. The window counts buckets instead; model.py states its only error: it may also count units
less than one bucket older than the window. Precisely, at t (bucket j = t // g) it counts the units at or after
(j - n) * g, which lies in (t - (n + 1) * g, t - W] (n * g >= W; n * g == W when n divides W). The properties:

(a) safety: whenever the exact log over (t - W, t] plus the units exceeds the count, the window refuses;
(b) bound: whenever the window refuses what the exact log allows, the exact log over (t - (n + 1) g, t] (that is
    (t - W - g, t] when n divides W) plus the units exceeds the count;
(c) all or nothing: a refused request consumed nothing but its `consume_refused` limits' charges;
(d) shadow limits never refuse; (e) weights (units) count; (f) `retry_us` is the first µs at which the same
    charge fits (it does not one µs earlier), `reset_us` the first µs at which the oldest counted units are gone.

Times here are small numbers of µs so that hypothesis reaches every edge; the arithmetic does not depend on scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from services.ratelimit.model import Charge, Count, Counted, Limit
from services.ratelimit.window import Window, evaluate

# --- the exact model ---------------------------------------------------------------------------------------


@dataclass
class Log:
    """What one limit's counter took in, exactly: (time, units) per addition."""

    entries: list[tuple[int, int]] = field(default_factory=list)

    def after(self, start_exclusive: int) -> int:
        return sum(units for time, units in self.entries if time > start_exclusive)


def peek(limit: Limit, window: Window, units: int, now_us: int) -> Counted:
    """The same charge evaluated at `now_us` without consuming, on a copy (no other traffic meanwhile)."""
    return evaluate([Charge(limit, units)], [Window(dict(window.counts))], now_us, consume=False)


@dataclass
class Stream:
    """Requests against `limits`, checked one by one against exact logs of what each counter took in and of
    what each limit let through."""

    limits: list[Limit]
    now_us: int
    windows: list[Window] = field(default_factory=list)
    taken: list[Log] = field(default_factory=list)  # everything added to the counter (incl. consume_refused)
    admitted: list[Log] = field(default_factory=list)  # the units of allowed requests
    refusals: int = 0
    bound_refusals: int = 0  # refusals an exact log would not have made (each within the bound)

    def __post_init__(self) -> None:
        self.windows = [Window() for _ in self.limits]
        self.taken = [Log() for _ in self.limits]
        self.admitted = [Log() for _ in self.limits]

    def request(self, dt: int, chosen: list[int], units: list[int], consume: bool) -> Counted:
        self.now_us += dt
        t = self.now_us
        charges = [Charge(self.limits[i], u) for i, u in zip(chosen, units, strict=True)]
        windows = [self.windows[i] for i in chosen]
        result = evaluate(charges, windows, t, consume=consume)
        assert result.now_us == t and len(result.counts) == len(charges)
        # (d) shadow limits never refuse: allowed is exactly "every enforcing charge fits"
        assert result.allowed == all(
            c.fits for c, ch in zip(result.counts, charges, strict=True) if not ch.limit.shadow
        )
        assert result.consumed == (consume and result.allowed)
        exact_allows = True
        for i, ch, count, window in zip(chosen, charges, result.counts, windows, strict=True):
            lim, u = ch.limit, ch.units
            n, g, w = lim.buckets, lim.bucket_us, lim.window_us
            added = consume and (result.allowed or lim.consume_refused)
            before = count.counted - (u if added else 0)
            # what the window counts: exactly the units taken at or after the start of bucket j - n
            start = (t // g - n) * g
            assert before == self.taken[i].after(start - 1)
            exact = self.taken[i].after(t - w)
            wide = self.taken[i].after(t - (n + 1) * g)
            assert count.fits == (before + u <= lim.count)
            # (a) safety: zero error on that side
            if exact + u > lim.count:
                assert not count.fits
            # (b) the bound: a refusal the exact log would not make is explained by units < one bucket older
            if not count.fits and exact + u <= lim.count:
                assert wide + u > lim.count
                if w % n == 0:
                    assert self.taken[i].after(t - w - g) + u > lim.count
            if not lim.shadow and exact + u > lim.count:
                exact_allows = False
            # (c) all or nothing, (e) the units are what counts
            assert window.counted(t // g, n) == count.counted
            if added and u:
                self.taken[i].entries.append((t, u))
            if result.consumed and u:
                self.admitted[i].entries.append((t, u))
            self._check_times(lim, window, u, count.counted, count.reset_us, count.retry_us, t)
        if not result.allowed:
            self.refusals += 1
            if exact_allows:
                self.bound_refusals += 1
        # the limits hold: in every window, the allowed units of an enforcing limit fit its count
        for lim, log in zip(self.limits, self.admitted, strict=True):
            if not lim.shadow:
                assert log.after(t - lim.window_us) <= lim.count
        return result

    @staticmethod
    def _check_times(
        lim: Limit, window: Window, units: int, counted_now: int, reset: int | None, retry: int | None, t: int
    ) -> None:
        # (f) retry: the first µs at which the same charge fits (no other traffic meanwhile)
        if units > lim.count:
            assert retry is None
        else:
            assert retry is not None and retry >= t
            assert peek(lim, window, units, retry).counts[0].fits
            if retry > t:
                assert not peek(lim, window, units, retry - 1).counts[0].fits
        # reset: None when nothing is counted; else the first µs at which the oldest counted units are gone
        if counted_now == 0:
            assert reset is None
        else:
            assert reset is not None and reset > t
            assert peek(lim, window, 0, reset - 1).counts[0].counted == counted_now
            assert peek(lim, window, 0, reset).counts[0].counted < counted_now


# --- properties ----------------------------------------------------------------------------------------------

limits_st = st.builds(
    lambda count, window_us, buckets, shadow, consume_refused: (
        count,
        window_us,
        buckets,
        shadow,
        consume_refused,
    ),
    st.integers(1, 12),
    st.integers(1, 40),
    st.integers(1, 8),
    st.booleans(),
    st.booleans(),
)
requests_st = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 4), st.integers(0, 60)),  # dt: mostly close together, sometimes far apart
        st.lists(st.booleans(), min_size=3, max_size=3),  # which limits the request charges
        st.lists(st.integers(1, 5), min_size=3, max_size=3),  # units per charge
        st.booleans() | st.just(True),  # consume (mostly)
    ),
    min_size=1,
    max_size=80,
)


def run(limits: list[Limit], start: int, requests: list[tuple[int, list[bool], list[int], bool]]) -> Stream:
    stream = Stream(limits, start)
    for dt, mask, units, consume in requests:
        chosen = [i for i in range(len(limits)) if mask[i]] or [0]
        stream.request(dt, chosen, [units[i] for i in chosen], consume)
    return stream


@settings(max_examples=400, deadline=None)
@given(
    specs=st.lists(limits_st, min_size=1, max_size=3),
    start=st.integers(0, 2**45),
    requests=requests_st,
)
def test_the_window_is_safe_and_errs_only_within_one_bucket(
    specs: list[tuple[int, int, int, bool, bool]],
    start: int,
    requests: list[tuple[int, list[bool], list[int], bool]],
) -> None:
    limits = [
        Limit(f"l{i}", "g", count, window_us, buckets=buckets, shadow=shadow, consume_refused=refused)
        for i, (count, window_us, buckets, shadow, refused) in enumerate(specs)
    ]
    run(limits, start, requests)


@settings(max_examples=300, deadline=None)
@given(
    burst=st.integers(2, 6),
    quota=st.integers(8, 40),
    per_day_buckets=st.sampled_from([4, 5, 8, 10]),
    consume_refused=st.booleans(),
    requests=requests_st,
)
def test_a_burst_limit_and_a_daily_quota_on_one_key_both_hold(
    burst: int,
    quota: int,
    per_day_buckets: int,
    consume_refused: bool,
    requests: list[tuple[int, list[bool], list[int], bool]],
) -> None:
    """A "per-second" limit (a window of 10 µs) and a "per-day" one (1000 µs) charged by every request."""
    per_second = Limit("per-second", "requests", burst, 10, buckets=5, consume_refused=consume_refused)
    per_day = Limit("per-day", "requests", quota, 1000, buckets=per_day_buckets)
    run(
        [per_second, per_day],
        1_700_000_000_000_000,
        [(dt, [True, True, False], units, consume) for dt, _, units, consume in requests],
    )


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 10),
    units=st.lists(st.integers(1, 4), min_size=1, max_size=40),
    shadow_count=st.integers(1, 3),
)
def test_shadow_limits_never_refuse_and_follow_real_traffic(
    count: int, units: list[int], shadow_count: int
) -> None:
    enforcing = Limit("real", "g", count, 100, buckets=4)
    shadow = Limit("shadow", "g", shadow_count, 100, buckets=4, shadow=True)
    windows = [Window(), Window()]
    for i, u in enumerate(units):
        result = evaluate([Charge(enforcing, u), Charge(shadow, u)], windows, 1000 + i, consume=True)
        assert result.allowed == result.counts[0].fits
        assert result.counts[1].counted == result.counts[0].counted  # the shadow counts what was admitted


# --- examples a reader can follow ------------------------------------------------------------------------------

THREE_PER_10 = Limit("three", "g", 3, 10, buckets=5)  # buckets of 2 µs: [0, 2), [2, 4), ...


def test_three_per_ten_microseconds_step_by_step() -> None:
    w = Window()
    for t in (0, 1, 2):
        r = evaluate([Charge(THREE_PER_10, 1)], [w], t, consume=True)
        assert r.allowed and r.counts[0].counted == t + 1
    # the fourth at t=3 is refused; the oldest unit (bucket 0) stops counting when bucket 6 starts, at t=12
    r = evaluate([Charge(THREE_PER_10, 1)], [w], 3, consume=True)
    assert not r.allowed and not r.consumed
    assert r.counts[0] == Count(counted=3, fits=False, reset_us=12, retry_us=12)
    # t=10: the exact log over (0, 10] holds 2 units (t=1, t=2) and would allow; the window still counts bucket 0
    # (t=0 and t=1): a refusal within the bound, the unit at t=0 being less than one bucket older than the window
    assert not evaluate([Charge(THREE_PER_10, 1)], [w], 10, consume=False).allowed
    assert not evaluate([Charge(THREE_PER_10, 1)], [w], 11, consume=False).allowed
    r = evaluate([Charge(THREE_PER_10, 1)], [w], 12, consume=True)  # bucket 0 has left: 1 counted (t=2), +1
    assert r.allowed and r.counts[0].counted == 2
    assert sorted(w.counts) == [1, 6]  # bucket 0 pruned


def test_weights_count_as_units() -> None:
    ten = Limit("ten", "g", 10, 100, buckets=10)
    w = Window()
    assert evaluate([Charge(ten, 4)], [w], 0, consume=True).counts[0].counted == 4
    assert evaluate([Charge(ten, 6)], [w], 1, consume=True).counts[0].counted == 10
    refused = evaluate([Charge(ten, 1)], [w], 2, consume=True)
    assert (
        not refused.allowed and refused.counts[0].retry_us == 110
    )  # both buckets leave at (0 + 10 + 1) * 10


def test_a_charge_larger_than_its_limit_never_fits() -> None:
    r = evaluate([Charge(THREE_PER_10, 4)], [Window()], 0, consume=True)
    assert not r.allowed and r.counts[0].retry_us is None and r.counts[0].reset_us is None


def test_all_or_nothing_with_consume_refused() -> None:
    small = Limit("small", "g", 1, 100, buckets=4)
    big = Limit("big", "g", 100, 100, buckets=4)
    strict = Limit("strict", "g", 100, 100, buckets=4, consume_refused=True)
    windows = [Window(), Window(), Window()]
    charges = [Charge(small, 1), Charge(big, 1), Charge(strict, 1)]
    assert evaluate(charges, windows, 0, consume=True).allowed
    refused = evaluate(charges, windows, 1, consume=True)
    assert not refused.allowed
    # nothing added to `big`; `strict` counted the refused request too
    assert [c.counted for c in refused.counts] == [1, 1, 2]
    peeked = evaluate(charges, windows, 2, consume=False)
    assert [c.counted for c in peeked.counts] == [1, 1, 2]  # a peek adds nothing


def test_a_shadow_limit_that_would_refuse_lets_the_request_through() -> None:
    shadow = Limit("trial", "g", 1, 100, buckets=4, shadow=True)
    w = Window()
    evaluate([Charge(shadow, 1)], [w], 0, consume=True)
    r = evaluate([Charge(shadow, 1)], [w], 1, consume=True)
    assert r.allowed and r.consumed and not r.counts[0].fits and r.counts[0].counted == 2

"""The action budget: at most N actions of a kind in any 60 s, per kind, on the injected clock (hypothesis: the
sliding log against a reference count)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.monitor.core.budget import WINDOW_US, Budget
from services.monitor.model import ActionKind


def test_each_kind_has_its_own_budget() -> None:
    budget = Budget({ActionKind.REVOKE_KEY: 2, ActionKind.KILL_SWITCH: 1})
    assert [budget.take(ActionKind.REVOKE_KEY, 0) for _ in range(3)] == [True, True, False]
    assert budget.take(ActionKind.KILL_SWITCH, 0) and not budget.take(ActionKind.KILL_SWITCH, 1)
    assert not budget.take(ActionKind.NOTIFY, 0)  # not in the budgets: none allowed
    assert budget.take(ActionKind.REVOKE_KEY, WINDOW_US)  # the first one a minute later has left the window


@settings(max_examples=100, deadline=None)
@given(
    limit=st.integers(min_value=0, max_value=5),
    gaps=st.lists(st.integers(min_value=0, max_value=40_000_000), max_size=60),
)
def test_never_more_than_the_limit_in_any_minute(limit: int, gaps: list[int]) -> None:
    budget = Budget({ActionKind.REVOKE_KEY: limit})
    taken: list[int] = []
    now = 0
    for gap in gaps:
        now += gap
        recent = [t for t in taken if t > now - WINDOW_US]
        assert budget.take(ActionKind.REVOKE_KEY, now) == (len(recent) < limit)
        if len(recent) < limit:
            taken.append(now)

"""annotate(): fields for the current RPC's log line, collected in a scope the telemetry interceptor opens."""

from __future__ import annotations

import asyncio

from tradeguard.observability.annotations import annotate, close_scope, open_scope


def test_outside_a_scope_nothing_is_collected() -> None:
    assert annotate(resource="x") is False


def test_a_scope_collects_later_values_win_and_closing_restores_the_outer_one() -> None:
    outer, outer_token = open_scope()
    assert annotate(resource="a", outcome="pending")
    inner, inner_token = open_scope()
    assert annotate(outcome="ok")
    close_scope(inner_token)
    assert annotate(outcome="denied")
    close_scope(outer_token)
    assert inner == {"outcome": "ok"}
    assert outer == {"resource": "a", "outcome": "denied"}
    assert annotate(resource="b") is False


async def test_concurrent_tasks_keep_their_own_scopes() -> None:
    async def call(name: str) -> dict[str, object]:
        scope, token = open_scope()
        annotate(resource=name)
        await asyncio.sleep(0)  # the other task runs here
        annotate(outcome=name + "-done")
        close_scope(token)
        return scope

    first, second = await asyncio.gather(call("a"), call("b"))
    assert first == {"resource": "a", "outcome": "a-done"}
    assert second == {"resource": "b", "outcome": "b-done"}

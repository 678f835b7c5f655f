"""Hypothesis properties of the decimal parser/canonicaliser and of page tokens."""

from __future__ import annotations

import base64
import re
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.trading.core import decode_page_token, encode_page_token, parse_decimal, parse_new_order
from services.trading.errors import InvalidArgument
from services.trading.model import OrderLimits, PageCursor, format_decimal

PLAIN = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]+)?")

plain_decimals = st.from_regex(r"\A(0|[1-9][0-9]{0,20})(\.[0-9]{1,20})?\Z")
any_decimals = st.builds(
    lambda n, e: Decimal(f"{n}E{e}"),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=-40, max_value=40),
)


@given(plain_decimals)
def test_parse_is_exact_and_canonical(text: str) -> None:
    value = parse_decimal(text)
    assert value == Decimal(text)  # same number, nothing rounded
    canonical = format_decimal(value)
    assert PLAIN.fullmatch(canonical)
    assert parse_decimal(canonical) == value
    assert format_decimal(parse_decimal(canonical)) == canonical  # the canonical form is a fixed point
    assert not ("." in canonical and canonical.endswith("0"))


@given(any_decimals)
def test_format_decimal_never_uses_exponents(value: Decimal) -> None:
    text = format_decimal(value)
    assert "e" not in text.lower()
    assert Decimal(text) == value
    if value >= 0 and len(text) <= 64:
        assert parse_decimal(text) == value
        assert format_decimal(parse_decimal(text)) == text
    elif value >= 0:  # up to 10**30 * 10**40 formats to more than the parser accepts: refused, not truncated
        with pytest.raises(ValueError, match="at most 64 characters"):
            parse_decimal(text)


@given(plain_decimals, st.sampled_from(["+", "-", " ", "\t", "\n", "\u00a0"]))
def test_rejects_signs_and_whitespace(text: str, extra: str) -> None:
    for mutated in (extra + text, text + extra) if extra in " \t\n\u00a0" else (extra + text,):
        with pytest.raises(ValueError):
            parse_decimal(mutated)


@given(plain_decimals, st.sampled_from(["e", "E"]), st.sampled_from(["", "+", "-"]), st.integers(0, 99))
def test_rejects_exponents(text: str, e: str, sign: str, exponent: int) -> None:
    with pytest.raises(ValueError):
        parse_decimal(f"{text}{e}{sign}{exponent}")


@given(st.text(max_size=80))
def test_parse_decimal_accepts_only_plain_strings(text: str) -> None:
    try:
        value = parse_decimal(text)
    except ValueError:
        assert not (PLAIN.fullmatch(text) and len(text) <= 64)
    else:
        assert PLAIN.fullmatch(text)
        assert value == Decimal(text)


@given(st.text(max_size=40), st.text(max_size=40))
def test_parse_new_order_only_raises_invalid_argument(quantity: str, price: str) -> None:
    try:
        parse_new_order(
            account_id="acct-1",
            client_order_id="c-1",
            symbol="BTC-USD",
            side=1,
            type=1,
            time_in_force=0,
            quantity=quantity,
            price=price,
            limits=OrderLimits(),
        )
    except InvalidArgument as error:
        assert {v.field for v in error.violations} <= {"quantity", "price"}


accounts = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
cursors = st.builds(
    PageCursor,
    account_id=accounts,
    create_time_us=st.integers(min_value=0, max_value=2**63 - 1),
    order_id=st.from_regex(r"\Aord_[0-9A-HJKMNP-TV-Z]{26}\Z"),
)


@given(cursors)
def test_page_token_round_trip(cursor: PageCursor) -> None:
    token = encode_page_token(cursor)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert decode_page_token(cursor.account_id, token) == cursor


@given(cursors, accounts)
def test_page_token_is_bound_to_its_account(cursor: PageCursor, other: str) -> None:
    token = encode_page_token(cursor)
    if other != cursor.account_id:
        with pytest.raises(InvalidArgument):
            decode_page_token(other, token)


def _decode_or_invalid(token: str) -> None:
    try:
        cursor = decode_page_token("acct-1", token)
    except InvalidArgument as error:
        assert [v.field for v in error.violations] == ["page_token"]
    else:
        assert encode_page_token(cursor) == token


@given(st.text(max_size=600))
def test_garbage_text_tokens(token: str) -> None:
    _decode_or_invalid(token)


@given(st.binary(max_size=400))
def test_garbage_base64_tokens(raw: bytes) -> None:
    _decode_or_invalid(base64.urlsafe_b64encode(raw).decode().rstrip("="))


@given(
    st.one_of(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
            lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children),
            max_leaves=10,
        ),
        st.tuples(st.integers(-2, 2), st.just("acct-1"), st.integers(), st.text(max_size=40)).map(list),
    )
)
def test_garbage_json_tokens(payload: object) -> None:
    import json

    raw = json.dumps(payload).encode()
    _decode_or_invalid(base64.urlsafe_b64encode(raw).decode().rstrip("="))


@given(cursors, st.data())
def test_mutated_tokens(cursor: PageCursor, data: st.DataObject) -> None:
    token = encode_page_token(cursor)
    index = data.draw(st.integers(0, len(token) - 1))
    char = data.draw(st.sampled_from("ABCabc019_-=+/ "))
    _decode_or_invalid(token[:index] + char + token[index + 1 :])
    _decode_or_invalid(token[:index])

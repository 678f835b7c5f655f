"""The kit's safe YAML reader (tradeguard/yamlfile.py): only plain YAML, bounded; typed, strict reads whose every
refusal is the format's error naming the line and the field path; garbage raises nothing but that error."""

from __future__ import annotations

import contextlib
import re
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from yaml.nodes import Node

from tradeguard.yamlfile import (
    MAX_BYTES,
    Reader,
    YamlError,
    check_size,
    compose,
    decode,
    key_path,
    parse_duration,
    short,
)


class FormatError(YamlError):
    """A format's own error class: every refusal is one."""


def root(text: str) -> Node:
    node = compose(text, "f.yaml", FormatError)
    assert node is not None
    return node


def reader() -> Reader:
    return Reader("f.yaml", FormatError)


def value_of(text: str) -> Node:
    return reader().fields(root(text), "", ("v",), ("v",))["v"]


def refusal(read: object) -> str:
    assert callable(read)
    with pytest.raises(FormatError) as caught:
        read()
    return str(caught.value)


# --- composing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: &x 1\nb: *x\n", "f.yaml:2: (syntax): aliases (*name) are not allowed"),
        ("a:" + " [" * 20, "f.yaml:1: (syntax): nested more than 16 levels deep"),
        ("a: [1\n", "f.yaml:2: (syntax): "),
        ("a: 1\x07\n", "f.yaml:1: (syntax): "),
        ("a: 1\n---\nb: 2\n", "f.yaml:2: (syntax): "),
    ],
)
def test_only_one_plain_bounded_document_is_composed(text: str, expected: str) -> None:
    assert refusal(lambda: compose(text, "f.yaml", FormatError)).startswith(expected)


def test_the_depth_bound_is_the_callers() -> None:
    compose("a: [[1]]", "f.yaml", FormatError, max_depth=4)
    assert "nested more than 3" in refusal(lambda: compose("a: [[1]]", "f.yaml", FormatError, max_depth=3))
    assert compose("# nothing\n", "f.yaml") is None


def test_sizes_and_encodings_are_checked_before_composing() -> None:
    assert check_size("a: 1", "f.yaml") == b"a: 1"
    assert refusal(lambda: check_size("#" * 11, "f.yaml", FormatError, max_bytes=10)) == (
        "f.yaml:1: (file): 11 bytes, more than the 10 allowed"
    )
    assert decode(b"a: 1\n", "f.yaml") == "a: 1\n"
    assert refusal(lambda: decode(b"#" * (MAX_BYTES + 1), "f.yaml", FormatError)).startswith(
        "f.yaml:1: (file): more"
    )
    assert (
        refusal(lambda: decode(b"a: 1\nb: 2\n# \xff\n", "f.yaml", FormatError))
        == "f.yaml:3: (file): not UTF-8 text"
    )


# --- typed reads ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "read", "expected"),
    [
        ("v: 1", lambda r, n: r.string(n, "v"), "f.yaml:1: v: '1' is an integer, not a string"),
        ("v: x", lambda r, n: r.integer(n, "v", 0, 9), "f.yaml:1: v: 'x' is a string, not an integer"),
        ("v: 10", lambda r, n: r.integer(n, "v", 0, 9), "f.yaml:1: v: 10 is out of range (0..9)"),
        ("v: " + "9" * 41, lambda r, n: r.integer(n, "v", 0, 9), "f.yaml:1: v: '9999999"),
        ("v: yes", lambda r, n: r.boolean(n, "v"), "f.yaml:1: v: 'yes' is ambiguous: write true or false"),
        ("v: [1]", lambda r, n: r.string(n, "v"), "f.yaml:1: v: a list where a string is expected"),
        (
            "v: !!binary aGk=",
            lambda r, n: r.string(n, "v"),
            "f.yaml:1: v: the tag tag:yaml.org,2002:binary is not",
        ),
        ("v: !custom x", lambda r, n: r.string(n, "v"), "f.yaml:1: v: the tag !custom is not allowed"),
        ("v: 2001-01-01", lambda r, n: r.string(n, "v"), "f.yaml:1: v: '2001-01-01' is a date, not a string"),
        (
            "v: .inf",
            lambda r, n: r.decimal(n, "v", Decimal(0), Decimal(9)),
            "f.yaml:1: v: '.inf' is not a decimal",
        ),
        (
            "v: 1.5e3",
            lambda r, n: r.decimal(n, "v", Decimal(0), Decimal(9)),
            "f.yaml:1: v: '1.5e3' is out of range",
        ),
        (
            "v: true",
            lambda r, n: r.decimal(n, "v", Decimal(0), Decimal(9)),
            "f.yaml:1: v: 'true' is not a decimal",
        ),
        (
            "v: 1:30",
            lambda r, n: r.decimal(n, "v", Decimal(0), Decimal(9)),
            "f.yaml:1: v: '1:30' is not a decimal",
        ),
        ("v: 1.5s", lambda r, n: r.duration(n, "v", 0, 10**9), "f.yaml:1: v: '1.5s' is not a duration"),
        ("v: '5'", lambda r, n: r.duration(n, "v", 0, 10**9), "f.yaml:1: v: '5' is not a duration"),
        (
            "v: 2d",
            lambda r, n: r.duration(n, "v", 0, 10**9),
            "f.yaml:1: v: '2d' is out of range (0..1000000000 µs)",
        ),
        ("v: {a: 1}", lambda r, n: r.sequence(n, "v"), "f.yaml:1: v: a mapping where a list is expected"),
        (
            "v: Bad",
            lambda r, n: r.name(n, "v", re.compile("[a-z]+"), "word"),
            "f.yaml:1: v: 'Bad' is not a valid word",
        ),
    ],
)
def test_a_typed_read_refuses_with_the_line_and_path(text: str, read: object, expected: str) -> None:
    node = value_of(text)
    assert callable(read)
    assert refusal(lambda: read(reader(), node)).startswith(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v: 7", Decimal(7)),
        ("v: 1_000", Decimal(1000)),
        ("v: 0.1", Decimal("0.1")),  # exactly, never through a binary float
        ("v: 1e6", Decimal("1e6")),
        ("v: '2.50'", Decimal("2.50")),
        ("v: -.5", Decimal("-0.5")),
    ],
)
def test_decimals_are_read_exactly_as_written(text: str, expected: Decimal) -> None:
    value = reader().decimal(value_of(text), "v", Decimal(-1), Decimal("1e7"))
    assert value == expected and str(value) == str(expected)


@pytest.mark.parametrize("text", ["v: 017", "v: '017'", "v: 00.5", "v: 0x10"])
def test_decimals_refuse_what_yaml_would_read_otherwise(text: str) -> None:
    read = reader().decimal
    assert "is not a decimal number" in refusal(lambda: read(value_of(text), "v", Decimal(0), Decimal(99)))


@pytest.mark.parametrize(
    ("text", "expected_us"),
    [
        ("v: 250ms", 250_000),
        ("v: 1s", 1_000_000),
        ("v: 5m", 300_000_000),
        ("v: 1h", 3_600_000_000),
        ("v: 30", 30_000_000),
        ("v: 0s", 0),
    ],
)
def test_durations(text: str, expected_us: int) -> None:
    assert reader().duration(value_of(text), "v", 0, 10**12) == expected_us


def test_parse_duration() -> None:
    assert (parse_duration("2d"), parse_duration("10ms"), parse_duration("01s"), parse_duration("1 s")) == (
        172_800_000_000,
        10_000,
        None,
        None,
    )


def test_scalars_read_back() -> None:
    r = reader()
    assert r.string(value_of("v: hello"), "v") == "hello"
    assert r.integer(value_of("v: 0x10"), "v", 0, 99) == 16
    assert r.boolean(value_of("v: false"), "v") is False


# --- mappings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: 1\na: 2\n", "f.yaml:2: a: duplicate key"),
        ("a: 1\nz: 2\n", "f.yaml:2: z: unknown key (allowed: a, b)"),
        ("b: 1\n", "f.yaml:1: a: missing"),
        ("1: 1\n", "f.yaml:1: (root): the key '1' is not a string (quote it)"),
        ("? [x]\n: 1\n", "f.yaml:1: (root): the key a list is not a string"),
        ("- a\n", "f.yaml:1: (root): a list where a mapping is expected"),
        ("<<: {a: 1}\n", "f.yaml:1: (root): the tag tag:yaml.org,2002:merge is not allowed"),
    ],
)
def test_mappings_refuse_duplicate_unknown_and_missing_keys(text: str, expected: str) -> None:
    assert refusal(lambda: reader().fields(root(text), "", ("a", "b"), ("a",))).startswith(expected)


def test_paths_quote_keys_that_are_not_plain() -> None:
    assert key_path("", "a") == "a"
    assert key_path("a", "b-c_1") == "a.b-c_1"
    assert key_path("a", 'x "y"') == 'a["x \\"y\\""]'
    assert short("x" * 100, 10) == "xxxxxxx..."
    nested = root('top:\n  "key:x":\n    n: nope\n')
    ((_, _, inner),) = reader().mapping(nested, "")
    ((key, _, value),) = reader().mapping(inner, "top")
    assert refusal(
        lambda: reader().integer(
            reader().fields(value, key_path("top", key), ("n",), ())["n"],
            key_path(key_path("top", key), "n"),
            0,
            1,
        )
    ) == ("""f.yaml:3: top["key:x"].n: 'nope' is a string, not an integer""")


# --- garbage -------------------------------------------------------------------------------------------------


def _walk(r: Reader, node: Node, path: str, depth: int = 0) -> None:
    """Every read on every node: whatever the text, only the format's error may come out."""
    for read in (
        lambda: r.string(node, path),
        lambda: r.integer(node, path, -5, 5),
        lambda: r.boolean(node, path),
        lambda: r.decimal(node, path, Decimal(-5), Decimal(5)),
        lambda: r.duration(node, path, 0, 10**9),
        lambda: r.sequence(node, path),
    ):
        with contextlib.suppress(FormatError):
            read()
    try:
        items = r.mapping(node, path)
    except FormatError:
        return
    for key, _, value in items:
        _walk(r, value, key_path(path, key), depth + 1)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_garbage_raises_nothing_but_the_formats_error(text: str) -> None:
    try:
        node = compose(text, "fuzz.yaml", FormatError)
    except FormatError as error:
        assert str(error).startswith("fuzz.yaml:")
        return
    if node is not None:
        _walk(reader(), node, "")

"""Configuration files in YAML, read safely and refused with the line and the field: the kit's one reader for the
rate limiter's limits file, the risk file and whatever file comes next.

A format's parser composes the text with `compose()` and walks the node tree with a `Reader`; every refusal is
the format's error class (a `YamlError` subclass) with the message "<source>:<line>: <path>: <problem>", the path
written as `tiers.standard.requests[0].window` (a key that is not plain is quoted: `overrides["key:x"]`):

- only plain YAML is read: the pure-Python safe composer (the C one recurses without a bound), no aliases (the
  billion-laughs bomb; refused at the first one), no tags beyond the core schema's (`!!python/...`, `!!binary`,
  `!custom`, the merge key `<<`), at most `max_depth` levels of nesting (default `MAX_DEPTH`);
- text is bounded before it is composed (`check_size`, `decode`: at most `max_bytes`, default `MAX_BYTES`), and
  bytes must be UTF-8 (`decode` names the line of the first bad byte);
- `Reader.mapping` refuses keys that are not strings, duplicate keys (YAML would silently keep the last) and, when
  told the allowed keys, unknown ones; `Reader.fields` also names a missing required key;
- scalars are typed strictly: `string`, `integer` (YAML 1.1 integers such as 1_000 read as YAML reads them,
  bounded), `boolean` (only `true`/`false`: YAML 1.1's `yes`, `on`... are refused as ambiguous), `decimal` (an
  integer, a plain decimal number or a quoted one, read exactly as written, never through a binary float; no
  leading zeros, which YAML 1.1 would read as octal),
  `duration` (`<n>ms|s|m|h|d` or an integer of seconds, as µs; `parse_duration` reads the text alone), `name`
  (a string matching a pattern).

Nothing here knows a format: a parser adds its own checks and calls `Reader.fail(node, path, problem)`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, Final, NoReturn, cast

import yaml
from yaml.error import Mark
from yaml.events import AliasEvent, Event
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "BOOL",
    "FLOAT",
    "INT",
    "MAX_BYTES",
    "MAX_DEPTH",
    "NULL",
    "STR",
    "Reader",
    "YamlError",
    "check_size",
    "compose",
    "decode",
    "key_path",
    "parse_duration",
    "short",
]

MAX_BYTES: Final = 1 << 20  # 1 MiB: far more than any real configuration file
MAX_DEPTH: Final = 16  # deeper is garbage (and the composer recurses)

_TAG = "tag:yaml.org,2002:"
STR, INT, BOOL, NULL, FLOAT = (f"{_TAG}{t}" for t in ("str", "int", "bool", "null", "float"))
_TAGS: Final = frozenset({STR, INT, BOOL, NULL, FLOAT, f"{_TAG}timestamp", f"{_TAG}map", f"{_TAG}seq"})
_KIND = {STR: "a string", INT: "an integer", BOOL: "a boolean", NULL: "null", FLOAT: "a number"}
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
# no leading zeros: YAML 1.1 reads 017 as octal fifteen, so an integer part of "017" is refused, not guessed
_DECIMAL = re.compile(
    r"[+-]?(?:(?:0|[1-9][0-9]{0,39})(?:\.[0-9]{0,40})?|\.[0-9]{1,40})(?:[eE][+-]?[0-9]{1,3})?"
)
_DURATION = re.compile(r"(0|[1-9][0-9]{0,9})(ms|s|m|h|d)")
_DURATION_US: Final = {"ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_INTEGERS = yaml.constructor.SafeConstructor()  # reads YAML 1.1 integers (1_000, 0x10) the way YAML does


class YamlError(ValueError):
    """A configuration file refused: "<source>:<line>: <path>: <problem>"."""


def short(text: str, size: int = 60) -> str:
    """`text`, cut to `size` characters with "..." when longer (a value quoted in an error)."""
    return text if len(text) <= size else text[: size - 3] + "..."


def key_path(path: str, key: str) -> str:
    """The path of `key` under `path`: `a.b`, or `a["b c"]` for a key that is not plain."""
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    quoted = key.replace("\\", "\\\\").replace('"', '\\"')
    return f'{path}["{short(quoted)}"]'


def parse_duration(text: str) -> int | None:
    """A duration in µs from `<n>ms|s|m|h|d` (`250ms`, `1s`, `5m`); None if the text is not one."""
    match = _DURATION.fullmatch(text)
    if match is None:
        return None
    return int(match.group(1)) * _DURATION_US[match.group(2)]


def check_size(
    text: str, source: str, error: type[YamlError] = YamlError, max_bytes: int = MAX_BYTES
) -> bytes:
    """The UTF-8 bytes of `text`; `error` if there are more than `max_bytes` of them."""
    data = text.encode("utf-8", errors="surrogatepass")
    if len(data) > max_bytes:
        raise error(f"{source}:1: (file): {len(data)} bytes, more than the {max_bytes} allowed")
    return data


def decode(data: bytes, source: str, error: type[YamlError] = YamlError, max_bytes: int = MAX_BYTES) -> str:
    """The text of a file's bytes; `error` if there are more than `max_bytes` or they are not UTF-8."""
    if len(data) > max_bytes:
        raise error(f"{source}:1: (file): more than the {max_bytes} bytes allowed")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as problem:
        line = data[: problem.start].count(b"\n") + 1
        raise error(f"{source}:{line}: (file): not UTF-8 text") from None


class _Loader(yaml.SafeLoader):
    """The pure-Python safe composer, refusing aliases and nesting deeper than `max_depth`."""

    def __init__(self, stream: str, max_depth: int) -> None:
        super().__init__(stream)
        self._depth = 0
        self._max_depth = max_depth

    def _refuse(self, problem: str) -> NoReturn:
        event: Event = self.peek_event()  # type: ignore[no-untyped-call]
        raise yaml.composer.ComposerError(None, None, problem, cast(Mark, event.start_mark))

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            self._refuse("aliases (*name) are not allowed in a configuration file")
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                self._refuse(f"nested more than {self._max_depth} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def compose(
    text: str, source: str, error: type[YamlError] = YamlError, max_depth: int = MAX_DEPTH
) -> Node | None:
    """The node tree of one YAML document (None if the text holds none); `error` at the line of a syntax error.

    Bound the text first (`check_size` or `decode`): the composer reads all of it."""
    loader: _Loader | None = None
    try:
        loader = _Loader(text, max_depth)  # the reader checks the characters here
        node: Node | None = loader.get_single_node()
    except yaml.MarkedYAMLError as problem:
        mark = problem.problem_mark or problem.context_mark
        line = mark.line + 1 if mark is not None else 1
        what = problem.problem or problem.context or "invalid YAML"
        raise error(f"{source}:{line}: (syntax): {what}") from None
    except yaml.YAMLError as problem:  # reader errors (control characters) carry no mark
        raise error(f"{source}:1: (syntax): {short(str(problem), 200)}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return node


class Reader:
    """Typed, strict reads of a composed node tree; every refusal an `error` naming the line and the path."""

    def __init__(self, source: str, error: type[YamlError] = YamlError) -> None:
        self.source = source
        self.error = error

    def fail(self, node: Node | None, path: str, problem: str) -> NoReturn:
        line = node.start_mark.line + 1 if node is not None else 1
        raise self.error(f"{self.source}:{line}: {path or '(root)'}: {problem}")

    # scalars ----------------------------------------------------------------------------------------------

    def shown(self, node: Node) -> str:
        """How a node is quoted in an error: its value (cut short), or "a list", "a mapping"."""
        if isinstance(node, ScalarNode):
            return repr(short(str(node.value)))
        return "a list" if isinstance(node, SequenceNode) else "a mapping"

    def plain(self, node: Node, path: str) -> None:
        """Refuse every tag beyond the core schema's (`!!python/...`, `!!binary`, `!custom`)."""
        if node.tag not in _TAGS:
            self.fail(node, path, f"the tag {short(node.tag)} is not allowed")

    def scalar(self, node: Node, path: str, tag: str, expected: str) -> ScalarNode:
        self.plain(node, path)
        if not isinstance(node, ScalarNode):
            self.fail(node, path, f"{self.shown(node)} where {expected} is expected")
        if node.tag != tag:
            kind = _KIND.get(node.tag, "a date")
            self.fail(node, path, f"{self.shown(node)} is {kind}, not {expected}")
        return node

    def string(self, node: Node, path: str) -> str:
        return str(self.scalar(node, path, STR, "a string").value)

    def integer(self, node: Node, path: str, low: int, high: int) -> int:
        scalar = self.scalar(node, path, INT, "an integer")
        if len(str(scalar.value)) > 40:
            self.fail(node, path, f"{self.shown(node)} is out of range ({low}..{high})")
        value: int = _INTEGERS.construct_yaml_int(scalar)
        if not low <= value <= high:
            self.fail(node, path, f"{value} is out of range ({low}..{high})")
        return value

    def boolean(self, node: Node, path: str) -> bool:
        scalar = self.scalar(node, path, BOOL, "a boolean")
        word = str(scalar.value).lower()
        if word not in ("true", "false"):
            self.fail(node, path, f"{self.shown(node)} is ambiguous: write true or false")
        return word == "true"

    def decimal(self, node: Node, path: str, low: Decimal, high: Decimal) -> Decimal:
        """A decimal number exactly as written (`100`, `0.05`, `"1e6"`), in `low..high`; no NaN, no infinity."""
        self.plain(node, path)
        if not isinstance(node, ScalarNode) or node.tag not in (INT, FLOAT, STR):
            self.fail(node, path, f"{self.shown(node)} is not a decimal number")
        text = str(node.value).replace("_", "") if node.tag != STR else str(node.value)
        if not _DECIMAL.fullmatch(text):
            self.fail(node, path, f"{self.shown(node)} is not a decimal number")
        try:
            value = Decimal(text)
        except InvalidOperation:  # pragma: no cover - the pattern admits only what Decimal reads
            self.fail(node, path, f"{self.shown(node)} is not a decimal number")
        if not low <= value <= high:
            self.fail(node, path, f"{self.shown(node)} is out of range ({low}..{high})")
        return value

    def duration(self, node: Node, path: str, low_us: int, high_us: int) -> int:
        """A duration in µs, written `<n>ms|s|m|h|d` or as an integer of seconds, in `low_us..high_us`."""
        self.plain(node, path)
        if isinstance(node, ScalarNode) and node.tag == INT:
            value = self.integer(node, path, 0, 10**10) * 1_000_000
        else:
            parsed = parse_duration(str(node.value)) if isinstance(node, ScalarNode) else None
            if parsed is None or node.tag != STR:
                self.fail(node, path, f"{self.shown(node)} is not a duration (e.g. 250ms, 1s, 5m)")
            value = parsed
        if not low_us <= value <= high_us:
            self.fail(node, path, f"{self.shown(node)} is out of range ({low_us}..{high_us} µs)")
        return value

    def name(self, node: Node, path: str, pattern: re.Pattern[str], what: str = "name") -> str:
        value = self.string(node, path)
        if not pattern.fullmatch(value):
            self.fail(node, path, f"{short(repr(value))} is not a valid {what}")
        return value

    # collections ------------------------------------------------------------------------------------------

    def mapping(
        self, node: Node, path: str, allowed: tuple[str, ...] | None = None
    ) -> list[tuple[str, Node, Node]]:
        """(key, key node, value node) of a mapping, keys being strings, unique, and in `allowed` if given."""
        self.plain(node, path)
        if not isinstance(node, MappingNode):
            self.fail(node, path, f"{self.shown(node)} where a mapping is expected")
        seen: set[str] = set()
        items: list[tuple[str, Node, Node]] = []
        for key_node, value_node in node.value:
            self.plain(key_node, path)
            if not isinstance(key_node, ScalarNode) or key_node.tag != STR:
                self.fail(key_node, path, f"the key {self.shown(key_node)} is not a string (quote it)")
            key = str(key_node.value)
            path_of_key = key_path(path, key)
            if key in seen:
                self.fail(key_node, path_of_key, "duplicate key")
            if allowed is not None and key not in allowed:
                self.fail(key_node, path_of_key, f"unknown key (allowed: {', '.join(allowed)})")
            seen.add(key)
            items.append((key, key_node, value_node))
        return items

    def fields(
        self, node: Node, path: str, allowed: tuple[str, ...], required: tuple[str, ...]
    ) -> dict[str, Node]:
        """The values of a mapping's keys, every key in `allowed`, every one of `required` present."""
        items = {key: value for key, _, value in self.mapping(node, path, allowed)}
        for key in required:
            if key not in items:
                self.fail(node, key_path(path, key), "missing")
        return items

    def sequence(self, node: Node, path: str) -> list[Node]:
        self.plain(node, path)
        if not isinstance(node, SequenceNode):
            self.fail(node, path, f"{self.shown(node)} where a list is expected")
        return list(node.value)

"""The chain's decode step on its own: malformed bodies and undefined enum values, found through the descriptor."""

from __future__ import annotations

import json

import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from tradeguard.echo.v1 import echo_pb2
from tradeguard.errors import InvalidArgument
from tradeguard.keyvault.v1 import keyvault_pb2
from tradeguard.rpc.handlers import enum_plan, request_decoder, undefined_enum_paths

DEFINED = sorted(echo_pb2.Tone.values())
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
# mostly defined values, sometimes anything an int32 can hold
TONES = st.one_of(st.sampled_from(DEFINED), st.sampled_from(DEFINED), INT32)
KEYS = st.text(min_size=0, max_size=4)


@st.composite
def requests(draw: st.DrawFn) -> tuple[echo_pb2.EchoRequest, set[str]]:
    """A request with enum values at every kind of place, and the paths of the undefined ones (at most 10)."""
    bad: set[str] = set()
    request = echo_pb2.EchoRequest(text=draw(st.text(max_size=8)))

    def tone(path: str) -> int:
        value = draw(TONES)
        if value not in DEFINED:
            bad.add(path)
        return value

    request.tone = tone("tone")  # type: ignore[assignment]
    for i in range(draw(st.integers(0, 3))):
        request.parts.add(text="p", tone=tone(f"parts[{i}].tone"))
    for key in draw(st.sets(KEYS, max_size=2)):
        request.tones[key] = tone(f"tones[{json.dumps(key)}]")  # type: ignore[assignment]  # keys as JSON strings
    if draw(st.booleans()):
        request.part.tone = tone("part.tone")  # type: ignore[assignment]
    for i in range(draw(st.integers(0, 2))):
        request.tone_list.append(tone(f"tone_list[{i}]"))  # type: ignore[arg-type]
    for key in draw(st.sets(st.sampled_from(["a", "b"]), max_size=1)):
        request.named_parts[key].tone = tone(f'named_parts["{key}"].tone')  # type: ignore[assignment]
    return request, bad


@settings(max_examples=300, deadline=None)
@given(requests())
def test_undefined_enum_values_are_found_wherever_they_are(
    case: tuple[echo_pb2.EchoRequest, set[str]],
) -> None:
    request, bad = case
    decode = request_decoder(echo_pb2.EchoRequest.FromString)
    assert decode is not None
    raw = request.SerializeToString()
    found = set(undefined_enum_paths(request))
    assert found == bad
    if bad:
        with pytest.raises(InvalidArgument) as err:
            decode(raw)
        assert err.value.reason == "UNDEFINED_ENUM_VALUE"
        assert {v.field for v in err.value.violations} == found
    else:
        assert decode(raw) == request


def test_map_keys_are_quoted_in_paths() -> None:
    request = echo_pb2.EchoRequest(tones={'a"b': 7})  # type: ignore[dict-item]
    assert undefined_enum_paths(request) == ['tones["a\\"b"]']


def test_at_most_ten_fields_are_named() -> None:
    request = echo_pb2.EchoRequest(tone_list=[9] * 50)  # type: ignore[list-item]
    assert undefined_enum_paths(request) == [f"tone_list[{i}]" for i in range(10)]


def test_recursive_types_are_planned_once_and_checked_at_depth() -> None:
    value = struct_pb2.Value()
    value.struct_value.fields["a"].list_value.values.add().null_value = 3  # type: ignore[assignment]
    assert undefined_enum_paths(value) == ['struct_value.fields["a"].list_value.values[0].null_value']
    assert enum_plan(struct_pb2.ListValue.DESCRIPTOR)  # inside the cycle: planned too


def test_types_without_enums_have_an_empty_plan_and_a_plain_decoder() -> None:
    assert enum_plan(echo_pb2.ExpandResponse.DESCRIPTOR) == []
    assert enum_plan(echo_pb2.CollectResponse.DESCRIPTOR) == []
    decode = request_decoder(echo_pb2.CollectResponse.FromString)
    assert decode is not None and decode.__name__ == "decode"
    assert decode.__qualname__.startswith("_plain_decoder")  # no enum check per call
    assert request_decoder(None) is None  # a handler of bytes is not decoded


@pytest.mark.parametrize("body", [b"\xff", b"\x0a\x05ab", b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80"])
def test_malformed_bodies_are_invalid_argument(body: bytes) -> None:
    decode = request_decoder(echo_pb2.EchoRequest.FromString)
    assert decode is not None
    with pytest.raises(InvalidArgument) as err:
        decode(body)
    assert err.value.reason == "MALFORMED_REQUEST"
    assert [v.field for v in err.value.violations] == ["request"]


def test_the_probed_case_keyvault_generate_data_key_format_7() -> None:
    decode = request_decoder(keyvault_pb2.GenerateDataKeyRequest.FromString)
    assert decode is not None
    raw = keyvault_pb2.GenerateDataKeyRequest(key_name="k", format=7).SerializeToString()  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as err:
        decode(raw)
    assert [v.field for v in err.value.violations] == ["format"]

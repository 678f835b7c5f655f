"""Key names and secret paths are plain paths: no `.`, `..` or empty segment, no trailing `/` (probing item 4).

`auth/../trading/x` used to be stored as it is and matched by the policy glob `secret/auth/*`; it and every other
such spelling is refused with INVALID_ARGUMENT naming the field, before the policy is asked.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.keyvault.core import KeyVault
from services.keyvault.errors import FieldViolation, InvalidArgument
from services.keyvault.keyring import SEGMENTS_RULE, check_key_name, segments_violation
from services.keyvault.model import KeyType
from services.keyvault.secret_store import check_path

AUTH, OPS = "auth", "ops"

BAD_FORMS = [
    "auth/../trading/x",  # the probe: matched secret/auth/* and named trading's secret
    "auth/..",
    "auth/./x",
    "auth/.",
    "auth//x",
    "auth/",
    "auth/x/",
    "a/b//",
]


@pytest.mark.parametrize("path", BAD_FORMS)
async def test_secret_paths_with_dot_segments_empty_segments_or_trailing_slash_are_refused(
    vault: KeyVault, path: str
) -> None:
    calls = [
        vault.put_secret(AUTH, "alice", path, b"v"),
        vault.get_secret(AUTH, "alice", path),
        vault.list_secret_versions(OPS, "alice", path),
        vault.destroy_secret_version(OPS, "alice", path, 1),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument) as refused:
            await call
        assert refused.value.violations == [FieldViolation("path", SEGMENTS_RULE)]
    assert await vault.put_secret(AUTH, "alice", "auth/x", b"v")  # the plain spelling still works


@pytest.mark.parametrize("name", BAD_FORMS)
async def test_key_names_with_dot_segments_empty_segments_or_trailing_slash_are_refused(
    vault: KeyVault, name: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await vault.create_key(OPS, name, KeyType.AES256_GCM)
    assert refused.value.violations == [FieldViolation("key_name", SEGMENTS_RULE)]
    with pytest.raises(InvalidArgument) as refused:
        await vault.encrypt(AUTH, name, b"x")
    assert refused.value.violations == [FieldViolation("key_name", SEGMENTS_RULE)]
    with pytest.raises(InvalidArgument) as refused:
        await vault.list_keys(OPS, 10, name)
    assert refused.value.violations == [FieldViolation("page_token", SEGMENTS_RULE)]


async def test_a_traversal_is_refused_before_the_policy_is_asked(vault: KeyVault) -> None:
    # trading may not touch secret/auth/*: the malformed path is refused for what it is, not as a denial.
    with pytest.raises(InvalidArgument):
        await vault.put_secret("trading", "alice", "auth/../trading/x", b"v")


# --- the validator, for any input ------------------------------------------------------------------------

SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)
PLAIN = st.lists(SEGMENT, min_size=1, max_size=6).map("/".join)
BAD_SEGMENT = st.sampled_from(["", ".", ".."])


@given(st.text(alphabet="abc./", max_size=20))
def test_the_rule_is_exactly_no_dot_dotdot_or_empty_segment(value: str) -> None:
    segments = value.split("/")
    assert (segments_violation(value) is None) == all(s not in ("", ".", "..") for s in segments)


@given(PLAIN.filter(lambda p: p[0].isalnum()))
def test_plain_paths_are_accepted(path: str) -> None:
    assert check_path(path) == path
    if len(path) <= 128:
        assert check_key_name(path) == path


@given(PLAIN, st.integers(min_value=0, max_value=6), BAD_SEGMENT, st.booleans())
def test_any_dot_or_empty_segment_is_refused_naming_the_field(
    path: str, position: int, bad: str, trailing_slash: bool
) -> None:
    segments = path.split("/")
    position = min(position, len(segments))
    if position == 0:
        position = 1  # a leading '.' or '/' is refused by the character rule already
    segments.insert(position, bad)
    value = "/".join(segments) + ("/" if trailing_slash else "")
    with pytest.raises(InvalidArgument) as refused:
        check_path(value)
    assert [v.field for v in refused.value.violations] == ["path"]
    if len(value) <= 128:
        with pytest.raises(InvalidArgument) as refused:
            check_key_name(value)
        assert [v.field for v in refused.value.violations] == ["key_name"]

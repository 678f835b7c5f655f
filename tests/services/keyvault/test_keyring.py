"""The pure key ring and the settings: properties of the ciphertext format, and start-up configuration."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.keyvault.errors import DecryptionFailed
from services.keyvault.keyring import LoadedKey, parse_token
from services.keyvault.model import KeyConfig, KeyType, StoredKey, VersionRecord

KEY = LoadedKey(
    StoredKey(
        KeyConfig("credentials", KeyType.AES256_GCM, 1, 0, False, 0, 0),
        (VersionRecord(1, b"", b"", 0),),
    ),
    {1: bytes(range(32))},
)


@settings(max_examples=200, deadline=None)
@given(
    plaintext=st.binary(max_size=256),
    ad=st.binary(max_size=64),
    nonce=st.binary(min_size=12, max_size=12),
    data=st.data(),
)
def test_round_trip_and_any_single_change_fails(
    plaintext: bytes, ad: bytes, nonce: bytes, data: st.DataObject
) -> None:
    ct = KEY.encrypt(plaintext, ad, nonce)
    token = parse_token(ct)
    assert token is not None and token.prefix == "tgv1:credentials:v1:"
    assert KEY.decrypt(ct, ad) == (plaintext, 1)
    i = data.draw(st.integers(0, len(ct) - 1))
    replacement = data.draw(st.sampled_from("Av1:_-x").filter(lambda c: c != ct[i]))
    with pytest.raises(DecryptionFailed):
        KEY.decrypt(ct[:i] + replacement + ct[i + 1 :], ad)
    other_ad = data.draw(st.binary(max_size=64).filter(lambda b: b != ad))
    with pytest.raises(DecryptionFailed):
        KEY.decrypt(ct, other_ad)

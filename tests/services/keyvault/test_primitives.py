"""Known-answer tests through the primitives module: NIST CAVP AES-GCM, RFC 4231, RFC 8032, RFC 5869, RFC 7914."""

from __future__ import annotations

import pytest

from services.keyvault import primitives

# NIST CAVP gcmEncryptExtIV256.rsp, [Keylen = 256] [IVlen = 96] [Taglen = 128].
# (key, iv, plaintext, aad, ciphertext, tag)
GCM_VECTORS = [
    pytest.param(
        "92e11dcdaa866f5ce790fd24501f92509aacf4cb8b1339d50c9c1240935dd08b",
        "ac93a1a6145299bde902f21a",
        "2d71bcfa914e4ac045b2aa60955fad24",
        "1e0889016f67601c8ebea4943bc23ad6",
        "8995ae2e6df3dbf96fac7b7137bae67f",
        "eca5aa77d51d4a0a14d9c51e1da474ab",
        id="PTlen=128,AADlen=128,Count=0",
    ),
    pytest.param(
        "83688deb4af8007f9b713b47cfa6c73e35ea7a3aa4ecdb414dded03bf7a0fd3a",
        "0b459724904e010a46901cf3",
        "33d893a2114ce06fc15d55e454cf90c3",
        "794a14ccd178c8ebfd1379dc704c5e208f9d8424",
        "cc66bee423e3fcd4c0865715e9586696",
        "0fb291bd3dba94a1dfd8b286cfb97ac5",
        id="PTlen=128,AADlen=160,Count=0",
    ),
    pytest.param(
        "5fe01c4baf01cbe07796d5aaef6ec1f45193a98a223594ae4f0ef4952e82e330",
        "bd587321566c7f1a5dd8652d",
        "881dc6c7a5d4509f3c4bd2daab08f165ddc204489aa8134562a4eac3d0bcad7965847b102733bb63d1e5c598ece0c3e5dadddd",
        "9013617817dda947e135ee6dd3653382",
        "16e375b4973b339d3f746c1c5a568bc7526e909ddff1e19c95c94a6ccff210c9a4a40679de5760c396ac0e2ceb1234f9f5fe26",
        "abd3d26d65a6275f7a4f56b422acab49",
        id="PTlen=408,AADlen=128,Count=0",
    ),
    pytest.param(
        "31bdadd96698c204aa9ce1448ea94ae1fb4a9a0b3c9d773b51bb1822666b8f22",
        "0d18e06c7c725ac9e362e1ce",
        "2db5168e932556f8089a0622981d017d",
        "",
        "fa4362189661d163fcd6a56d8bf0405a",
        "d636ac1bbedd5cc3ee727dc2ab4a9489",
        id="PTlen=128,AADlen=0,Count=0",
    ),
    pytest.param(
        "460fc864972261c2560e1eb88761ff1c992b982497bd2ac36c04071cbb8e5d99",
        "8a4a16b9e210eb68bcb6f58d",
        "99e4e926ffe927f691893fb79a96b067",
        "",
        "133fc15751621b5f325c7ff71ce08324",
        "ec4e87e0cf74a13618d0b68636ba9fa7",
        id="PTlen=128,AADlen=0,Count=1",
    ),
]


@pytest.mark.parametrize(("key", "iv", "pt", "aad", "ct", "tag"), GCM_VECTORS)
def test_nist_aes_256_gcm_encrypt(key: str, iv: str, pt: str, aad: str, ct: str, tag: str) -> None:
    k, n, p, a = bytes.fromhex(key), bytes.fromhex(iv), bytes.fromhex(pt), bytes.fromhex(aad)
    sealed = primitives.aes_gcm_seal(k, n, p, a)
    assert sealed[: len(p)].hex() == ct
    assert sealed[len(p) :].hex() == tag  # the tag, checked on its own
    assert primitives.aes_gcm_open(k, n, sealed, a) == p


@pytest.mark.parametrize(("key", "iv", "pt", "aad", "ct", "tag"), GCM_VECTORS)
def test_nist_aes_256_gcm_rejects_any_change(key: str, iv: str, pt: str, aad: str, ct: str, tag: str) -> None:
    k, n, a = bytes.fromhex(key), bytes.fromhex(iv), bytes.fromhex(aad)
    sealed = bytes.fromhex(ct + tag)
    for i in range(len(sealed)):  # every byte of ciphertext and tag
        bad = bytearray(sealed)
        bad[i] ^= 0x80
        with pytest.raises(primitives.IntegrityError):
            primitives.aes_gcm_open(k, n, bytes(bad), a)
    with pytest.raises(primitives.IntegrityError):
        primitives.aes_gcm_open(k, n, sealed, a + b"\x00")
    with pytest.raises(primitives.IntegrityError):
        primitives.aes_gcm_open(k, n, sealed[:-1], a)  # truncated tag
    with pytest.raises(primitives.IntegrityError):
        primitives.aes_gcm_open(k, bytes(12), sealed, a)  # other nonce
    with pytest.raises(primitives.IntegrityError):
        primitives.aes_gcm_open(bytes(32), n, sealed, a)  # other key


def test_aead_refuses_bad_sizes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        primitives.Aead(bytes(16))  # AES-128 is not offered
    with pytest.raises(ValueError, match="12 bytes"):
        primitives.Aead(bytes(32)).seal(bytes(8), b"x", b"")
    with pytest.raises(primitives.IntegrityError):
        primitives.Aead(bytes(32)).open(bytes(12), bytes(15), b"")


def test_hmac_sha256_rfc4231_case_2() -> None:
    mac = primitives.hmac_sha256(b"Jefe", b"what do ya want for nothing?")
    assert mac.hex() == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    key = primitives.HmacKey(bytes(range(32)))
    assert key.verify(b"data", key.mac(b"data"))
    assert not key.verify(b"data!", key.mac(b"data"))
    with pytest.raises(ValueError, match="at least 32"):
        primitives.HmacKey(b"short")


def test_ed25519_rfc8032_test_1() -> None:
    signer = primitives.Ed25519Signer(
        bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    )
    assert signer.public_key.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    signature = signer.sign(b"")
    assert signature.hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    assert primitives.ed25519_verify(signer.public_key, b"", signature)
    assert not primitives.ed25519_verify(signer.public_key, b"x", signature)
    assert not primitives.ed25519_verify(signer.public_key, b"", signature[:-1])
    assert not primitives.ed25519_verify(b"short", b"", signature)


def test_hkdf_rfc5869_case_1() -> None:
    okm = primitives.hkdf_sha256(
        bytes([0x0B] * 22), bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"), salt=bytes(range(13)), length=42
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_scrypt_rfc7914_vector_2() -> None:
    derived = primitives.scrypt_derive(b"password", b"NaCl", n=1024, r=8, p=16, length=64)
    assert derived.hex() == (
        "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162"
        "2eaf30d92e22a3886ff109279d9830dac727afb94a83ee6d8360cbdfa2cc0640"
    )

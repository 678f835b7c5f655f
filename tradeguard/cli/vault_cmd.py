"""`tradeguard vault …`: operate the key vault (seal status, unseal, keys, encrypt/decrypt) over the mesh.

Key administration runs as `ops`; the key vault's policy decides who may use key material, so `encrypt` and
`decrypt` take `--as` (for example `--as auth`, before or after the action). Passphrases are read from the
terminal or stdin, never from the command line (where `ps` would show them).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from typing import Any

from google.protobuf import duration_pb2

from tradeguard.cli import common
from tradeguard.cli.mesh_call import call_service, to_json
from tradeguard.keyvault.v1 import keyvault_pb2 as pb
from tradeguard.keyvault.v1 import keyvault_pb2_grpc

KEY_TYPES = {
    "aes256-gcm": pb.KEY_TYPE_AES256_GCM,
    "hmac-sha256": pb.KEY_TYPE_HMAC_SHA256,
    "ed25519": pb.KEY_TYPE_ED25519,
}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    action = common.service_command(
        subparsers,
        "vault",
        "operate the key vault",
        __doc__,
        service="keyvault",
        run=lambda args: asyncio.run(_run(args)),
    )

    action("status", "sealed or not, and the root key's kind (every field printed)")
    action("unseal", "unseal with the passphrase (local root) or PIN (HSM), read from the terminal or stdin")
    action("keys", "list keys (metadata only, never material)")
    create = action("create-key", "create a named key (version 1)")
    create.add_argument("name", help="the key's name, e.g. credentials")
    create.add_argument("--type", choices=sorted(KEY_TYPES), default="aes256-gcm", help="key type")
    create.add_argument("--rotate-days", type=float, default=0.0, help="automatic rotation period (0: off)")
    rotate = action("rotate-key", "add a new version of a key; new data is encrypted under it")
    rotate.add_argument("name", help="the key's name")
    encrypt = action("encrypt", "encrypt stdin under a key; prints the ciphertext (tgv1:<key>:v<n>:…)")
    encrypt.add_argument("name", help="the key's name")
    encrypt.add_argument(
        "--context", default="", help="associated data: bound to the ciphertext, needed again to decrypt"
    )
    decrypt = action("decrypt", "decrypt CIPHERTEXT; writes the plaintext to stdout")
    decrypt.add_argument("name", help="the key's name")
    decrypt.add_argument("ciphertext", help="as `encrypt` printed it")
    decrypt.add_argument("--context", default="", help="the associated data given to `encrypt`")


def _read_secret(prompt: str) -> str:
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    return sys.stdin.readline().rstrip("\n")


async def _call(stub: keyvault_pb2_grpc.KeyVaultServiceAsyncStub, args: argparse.Namespace) -> Any:
    action = args.action
    if action == "status":
        return await stub.GetSealStatus(pb.GetSealStatusRequest(), timeout=10)
    if action == "unseal":
        return await stub.Unseal(pb.UnsealRequest(passphrase=_read_secret("passphrase: ")), timeout=30)
    if action == "keys":
        return await stub.ListKeys(pb.ListKeysRequest(), timeout=10)
    if action == "create-key":
        period = duration_pb2.Duration(seconds=int(args.rotate_days * 86400))
        return await stub.CreateKey(
            pb.CreateKeyRequest(name=args.name, type=KEY_TYPES[args.type], auto_rotate_period=period),
            timeout=10,
        )
    if action == "rotate-key":
        return await stub.RotateKey(pb.RotateKeyRequest(name=args.name), timeout=10)
    if action == "encrypt":
        request = pb.EncryptRequest(
            key_name=args.name, plaintext=sys.stdin.buffer.read(), associated_data=args.context.encode()
        )
        return await stub.Encrypt(request, timeout=10)
    request_d = pb.DecryptRequest(
        key_name=args.name, ciphertext=args.ciphertext, associated_data=args.context.encode()
    )
    return await stub.Decrypt(request_d, timeout=10)


async def _run(args: argparse.Namespace) -> int:
    reply = await call_service(
        args, "keyvault", lambda channel: _call(keyvault_pb2_grpc.KeyVaultServiceStub(channel), args)
    )
    if reply is None:
        return 1
    if isinstance(reply, pb.EncryptResponse):
        print(reply.ciphertext)
    elif isinstance(reply, pb.DecryptResponse):
        sys.stdout.buffer.write(reply.plaintext)
    else:
        print(to_json(reply))
    return 0

"""`tradeguard vault …`: operate the key vault (seal status, unseal, keys, encrypt/decrypt) over the mesh.

Key administration runs as `ops`; the key vault's policy decides who may use key material, so `encrypt` and
`decrypt` take `--as` (for example `--as auth`). Passphrases are read from the terminal or stdin, never
from the command line (where `ps` would show them).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from typing import Any

from google.protobuf import duration_pb2, json_format

from tradeguard.cli.mesh_call import call_service
from tradeguard.keyvault.v1 import keyvault_pb2 as pb
from tradeguard.keyvault.v1 import keyvault_pb2_grpc

KEY_TYPES = {
    "aes256-gcm": pb.KEY_TYPE_AES256_GCM,
    "hmac-sha256": pb.KEY_TYPE_HMAC_SHA256,
    "ed25519": pb.KEY_TYPE_ED25519,
}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vault = subparsers.add_parser("vault", help="operate the key vault")
    vault.add_argument(
        "--target", default=None, help="host:port (default 127.0.0.1:$TRADEGUARD_KEYVAULT_PORT)"
    )
    vault.add_argument(
        "--as", dest="identity", default="ops", help="workload certificate to use (default ops)"
    )
    sub = vault.add_subparsers(dest="action", required=True)
    sub.add_parser("status", help="sealed or not, and the root key's kind")
    sub.add_parser("unseal", help="unseal with the passphrase (local root) or PIN (HSM), read from stdin/tty")
    sub.add_parser("keys", help="list keys (metadata only)")
    create = sub.add_parser("create-key")
    create.add_argument("name")
    create.add_argument("--type", choices=sorted(KEY_TYPES), default="aes256-gcm")
    create.add_argument("--rotate-days", type=float, default=0.0, help="automatic rotation period (0: off)")
    rotate = sub.add_parser("rotate-key")
    rotate.add_argument("name")
    encrypt = sub.add_parser("encrypt", help="encrypt stdin; prints the ciphertext")
    encrypt.add_argument("name")
    encrypt.add_argument("--context", default="", help="associated data (bound to the ciphertext)")
    decrypt = sub.add_parser("decrypt", help="decrypt CIPHERTEXT; writes the plaintext to stdout")
    decrypt.add_argument("name")
    decrypt.add_argument("ciphertext")
    decrypt.add_argument("--context", default="")
    vault.set_defaults(func=lambda args: asyncio.run(_run(args)))


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
        args, "keyvault", 50054, lambda channel: _call(keyvault_pb2_grpc.KeyVaultServiceStub(channel), args)
    )
    if reply is None:
        return 1
    if isinstance(reply, pb.EncryptResponse):
        print(reply.ciphertext)
    elif isinstance(reply, pb.DecryptResponse):
        sys.stdout.buffer.write(reply.plaintext)
    else:
        print(json_format.MessageToJson(reply, preserving_proto_field_name=True) or "{}")
    return 0

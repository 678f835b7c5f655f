"""Key vault Encrypt and Decrypt of 64-byte values over mutual TLS, beside the same round trip with no crypto.

The real key vault service (services.keyvault.service.SERVICE: mTLS, interceptors, SQLite store, local sealed root)
runs in its own process; the client runs in this one. The round trip without crypto is GetSealStatus on the
same server, channel and interceptor chain (it touches neither keys nor store). Rounds alternate between the
three calls so that drift hits all alike; the ratios are medians over rounds.
The server takes the environment: TRADEGUARD_KEYVAULT_KEY_FRESHNESS_S=0 measures the strict mode (a store read of
the key's stamp before every use) instead of the default 0.5 s window.
The vault's own recording of decryptions in the audit service is off here (the crypto alone).
Aim (issue 3): 5k Encrypt/s or more at 32 concurrent callers (HashiCorp's published Transit sample: ~1.8k/s).

    python -m bench.keyvault_crypto [--concurrency 32] [--duration 5] [--rounds 3]
"""

from __future__ import annotations

import tradeguard  # noqa: F401  (first: grpc must load with the TLS 1.3-only setting)

# isort: split

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.loadgen import Result, closed_loop, free_port, load_arguments, median_ratio, until_answered
from bench.mesh import dev_pki
from tradeguard import eventloop
from tradeguard.keyvault.v1 import keyvault_pb2 as pb
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.mesh import tls
from tradeguard.mesh.channel import MeshChannel

PASSPHRASE = "bench passphrase"
KEY = "credentials"
VALUE = bytes(range(64))


def start_server(port: int, home: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TRADEGUARD_HOME": str(home),
        "TRADEGUARD_KEYVAULT_PORT": str(port),
        "TRADEGUARD_KEYVAULT_PASSPHRASE": PASSPHRASE,
        # the vault's crypto alone: decryptions not recorded (recording on, each Decrypt also waits for its
        # batched audit append, as bench/audit.py measures appends)
        "TRADEGUARD_KEYVAULT_AUDIT": "false",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "bench.keyvault_crypto", "--serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def ready(stub: keyvault_pb2_grpc.KeyVaultServiceAsyncStub) -> None:
    await until_answered(lambda: stub.GetSealStatus(pb.GetSealStatusRequest(), timeout=1), "key vault")


Call = Callable[[int], Awaitable[object]]


async def run(concurrency: int, duration: float, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        paths = dev_pki(home, ("keyvault", "ops", "auth"))
        port = free_port()
        proc = start_server(port, home)
        try:
            target = f"127.0.0.1:{port}"
            ops_channel = MeshChannel(target, "keyvault", tls.Workload.of(paths, "ops"))
            channel = MeshChannel(target, "keyvault", tls.Workload.of(paths, "auth"))
            ops = keyvault_pb2_grpc.KeyVaultServiceStub(ops_channel)
            stub = keyvault_pb2_grpc.KeyVaultServiceStub(channel)
            await ready(stub)
            await ops.CreateKey(pb.CreateKeyRequest(name=KEY, type=pb.KEY_TYPE_AES256_GCM), timeout=10)
            sealed = (
                await stub.Encrypt(pb.EncryptRequest(key_name=KEY, plaintext=VALUE, associated_data=b"ad"))
            ).ciphertext
            assert (
                await stub.Decrypt(pb.DecryptRequest(key_name=KEY, ciphertext=sealed, associated_data=b"ad"))
            ).plaintext == VALUE

            encrypt_request = pb.EncryptRequest(key_name=KEY, plaintext=VALUE, associated_data=b"ad")
            decrypt_request = pb.DecryptRequest(key_name=KEY, ciphertext=sealed, associated_data=b"ad")
            bare_request = pb.GetSealStatusRequest()

            async def bare(i: int) -> object:
                return await stub.GetSealStatus(bare_request, timeout=10)

            async def encrypt(i: int) -> object:
                return await stub.Encrypt(encrypt_request, timeout=10)

            async def decrypt(i: int) -> object:
                return await stub.Decrypt(decrypt_request, timeout=10)

            calls: dict[str, Call] = {"bare": bare, "encrypt": encrypt, "decrypt": decrypt}
            results: dict[str, list[Result]] = {name: [] for name in calls}
            print(
                f"Key vault over mTLS, 64-byte values, {concurrency} concurrent callers, "
                f"{duration:.0f} s per round, {rounds} rounds"
            )
            for r in range(rounds):
                for name, call in calls.items():
                    res = await closed_loop(call, concurrency=concurrency, duration=duration)
                    results[name].append(res)
                    print(res.line(f"round {r + 1} {name}"))
            print()
            for name in ("encrypt", "decrypt"):
                ratio = median_ratio(results[name], results["bare"])
                best = max(x.rps for x in results[name])
                print(
                    f"{name:<8} / bare round trip (median of rounds): {ratio:.3f}   best {best:,.0f} calls/s"
                )
            await channel.close()
            await ops_channel.close()
        finally:
            proc.terminate()
            proc.wait(20)


def serve() -> None:
    from services.keyvault.service import SERVICE
    from services.keyvault.settings import Settings
    from tradeguard.observability.logging import configure_logging
    from tradeguard.service import serve as serve_service

    configure_logging(json=True)
    settings = Settings.from_env()
    eventloop.run(serve_service(SERVICE, settings), settings.server.event_loop)


def main() -> None:
    parser = load_arguments(__doc__)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
    else:
        asyncio.run(run(args.concurrency, args.duration, args.rounds))


if __name__ == "__main__":
    main()

"""What the benchmarks need to run servers on the mesh: a fresh dev PKI, and a client channel over mutual TLS.

The channel is a plain grpc.aio one with no interceptor (not a MeshChannel): the load generator's side stays the
same in every mode a benchmark compares."""

from __future__ import annotations

import tradeguard  # noqa: F401  (first: grpc must load with the TLS 1.3-only setting)

# isort: split

from collections.abc import Iterable
from pathlib import Path

import grpc

from tradeguard.mesh import pki, tls


def dev_pki(home: Path, workloads: Iterable[str]) -> pki.PkiPaths:
    """A new CA under `home` and a certificate for each of `workloads`."""
    paths = pki.PkiPaths(home)
    pki.init_ca(paths)
    for workload in workloads:
        pki.issue(paths, workload)
    return paths


def mtls_channel(port: int, server_name: str, workload: tls.Workload) -> grpc.aio.Channel:
    """To the server `server_name` listening on loopback `port`, as `workload`."""
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        tls.channel_credentials(workload),
        options=[("grpc.ssl_target_name_override", server_name)],
    )

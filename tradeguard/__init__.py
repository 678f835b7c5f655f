"""Tradeguard: the kit every Tradeguard service and every trading service imports.

TLS 1.3 only: grpcio has no minimum-version setting, so the TLS 1.2 cipher list is narrowed to a
pre-shared-key suite that no certificate handshake can use. grpc reads GRPC_SSL_CIPHER_SUITES once,
when it is first imported, so it is set here, before any of our modules imports grpc. Servers also
probe themselves with a real TLS 1.2 client at start-up and refuse to serve if it gets through
(tradeguard.mesh.tls.assert_tls12_refused), so a process that imported grpc first fails closed.
"""

import os as _os
import sys as _sys
import warnings as _warnings

TLS12_DENY_CIPHERS = "ECDHE-PSK-CHACHA20-POLY1305"
if "grpc" in _sys.modules and _os.environ.get("GRPC_SSL_CIPHER_SUITES") != TLS12_DENY_CIPHERS:
    _warnings.warn(
        "grpc was imported before tradeguard: its servers in this process would accept TLS 1.2 "
        "(they refuse to start); import tradeguard first or set GRPC_SSL_CIPHER_SUITES="
        f"{TLS12_DENY_CIPHERS} in the environment",
        RuntimeWarning,
        stacklevel=2,
    )
_os.environ["GRPC_SSL_CIPHER_SUITES"] = TLS12_DENY_CIPHERS

"""Tradeguard's services. Importing `tradeguard` first sets grpc's TLS 1.3-only cipher setting."""

import tradeguard  # noqa: F401

"""Refused TLS handshakes as structured log events, and a quiet TLS 1.2 self-probe.

grpc core reports a refused handshake only as a raw line on file descriptor 2, written by its C++ logging
(absl), for example::

    I1130 09:06:12.851631    8458 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL:
    error:100000b8:SSL routines:OPENSSL_internal:NO_SHARED_CIPHER: Invalid certificate verification context

What grpcio 1.85 offers instead, checked here: `GRPC_VERBOSITY=ERROR` silences that line (it is INFO) along
with every other INFO line, so refusals would vanish entirely; `GRPC_TRACE=handshaker` adds the peer address,
but only in multi-line DEBUG dumps of every handshake, successful or not ("not suitable for production", grpc
says); the certificate fetcher (`grpc.dynamic_ssl_server_credentials`) runs before each handshake but learns
neither the peer nor the outcome; grpc's Python API has no log sink or handshake callback. So `install()`
reads grpc core's lines in process: file descriptor 2 becomes a pipe read by one thread, which

- turns each "Handshake failed" line into one structured `tls_handshake_refused` warning through the kit's
  logging (reason — the TLS alert or error name, such as `NO_SHARED_CIPHER` for a TLS 1.2 client or
  `PEER_DID_NOT_RETURN_A_CERTIFICATE` for a client without a certificate — and grpc's detail; grpc does not
  log the peer's address, so the event has `peer: null`);
- recognises the refusal of the server's own TLS 1.2 self-probe (tradeguard.mesh.tls.assert_tls12_refused,
  bracketed by markers it writes through the same pipe, so the line is known to be inside it) and drops it:
  the probe logs its own `tls12_self_probe_refused` info event, so no start-up line reads as a fault;
- passes every other byte through to the original stderr unchanged.

Python's own `sys.stderr` is pointed at the original stderr directly (and faulthandler with it), so only
native writers go through the pipe; the events are written by a second thread so that the reader never
writes into the pipe it drains (which could block it forever). `uninstall()` (also run at exit) restores
file descriptor 2 and forwards whatever is still in the pipe. A process that aborts in native code can lose
the native lines still in the pipe at that moment. With `GRPC_VERBOSITY=ERROR` (or `NONE`) grpc writes no such
line, and there is nothing to turn into an event.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import io
import os
import queue
import re
import secrets
import select
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, TextIO

from tradeguard.observability.logging import get_logger

__all__ = ["HandshakeLog", "install", "installed", "self_probe", "uninstall"]

_log = get_logger("tradeguard.tls")

#: absl's line prefix: severity, MMDD, time, thread id, file:line] message
_ABSL_LINE: Final = re.compile(
    rb"^(?P<severity>[IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (?P<source>[\w./-]+):\d+\] (?P<message>.*)$"
)
_HANDSHAKE_FAILED: Final = re.compile(
    rb"Handshake failed with (?:fatal )?error (?P<error>[A-Z_0-9]+)(?P<rest>.*)$"
)
_OPENSSL_REASON: Final = re.compile(rb":(?:SSL routines|[A-Za-z ]+):OPENSSL_internal:(?P<reason>[A-Z0-9_]+)")
_TLS12_PROBE_REASON: Final = "NO_SHARED_CIPHER"
#: A half line is held back this long for its end (absl writes whole lines; other native writers may not).
_PARTIAL_FLUSH_S: Final = 0.05
_MAX_LINE: Final = 64 * 1024
_MAX_PENDING_EVENTS: Final = 10_000


@dataclass(frozen=True)
class Refusal:
    """What grpc core said about one refused handshake."""

    reason: str
    error: str
    detail: str
    grpc_source: str


def parse_handshake_line(line: bytes) -> Refusal | None:
    """The refusal described by one of grpc core's log lines (without its newline), or None."""
    match = _ABSL_LINE.match(line)
    if match is None:
        return None
    failed = _HANDSHAKE_FAILED.search(match["message"])
    if failed is None:
        return None
    reason = _OPENSSL_REASON.search(failed["rest"])
    error = failed["error"].decode("ascii", "replace")
    return Refusal(
        reason=reason["reason"].decode("ascii", "replace") if reason is not None else error,
        error=error,
        detail=failed["rest"].lstrip(b": ").decode("utf-8", "replace")[:500],
        grpc_source=match["source"].decode("ascii", "replace"),
    )


class HandshakeLog:
    """The capture of file descriptor 2 (see the module's docstring). One per process: use `install()`."""

    def __init__(self) -> None:
        self._token = secrets.token_hex(8)
        self._begin = f"\x00tradeguard-probe-begin:{self._token}".encode()
        self._end = f"\x00tradeguard-probe-end:{self._token}".encode()
        self._open_windows = 0
        self._unmatched_probes = 0
        self.probe_lines = 0  # grpc lines recognised as the self-probe's and dropped
        self._events: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(_MAX_PENDING_EVENTS)
        self.dropped = 0
        previous: TextIO | None = sys.stderr
        if previous is not None:
            previous.flush()
        self._saved = os.dup(2)  # OSError when there is no file descriptor 2: nothing to capture
        read_end, write_end = os.pipe()
        self._read_end = read_end
        self._saved_stderr = previous
        self._direct = _text_stream(self._saved, previous)
        os.dup2(write_end, 2)
        os.close(write_end)
        sys.stderr = self._direct
        if faulthandler.is_enabled():
            faulthandler.enable(file=self._direct)
        self._reader = threading.Thread(target=self._read, name="grpc-log-reader", daemon=True)
        self._emitter = threading.Thread(target=self._emit, name="grpc-log-events", daemon=True)
        self._reader.start()
        self._emitter.start()

    # -- the self-probe ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def probe_window(self) -> Iterator[None]:
        """Brackets the TLS 1.2 self-probe: its refusal, logged by grpc inside, is recognised as such."""
        os.write(2, self._begin + b"\n")
        try:
            yield
        finally:
            os.write(2, self._end + b"\n")

    # -- the reader thread: drains the pipe, writes only to the original stderr ----------------------------

    def _read(self) -> None:
        pending = b""
        try:
            while True:
                if pending:
                    ready, _, _ = select.select([self._read_end], [], [], _PARTIAL_FLUSH_S)
                    if not ready:  # a half line that nothing completes: pass it on as it is
                        self._passthrough(pending)
                        pending = b""
                        continue
                chunk = os.read(self._read_end, 65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line)
                if len(pending) > _MAX_LINE:
                    self._passthrough(pending)
                    pending = b""
        except Exception as error:  # never stop draining because of one bad line
            self._passthrough(f"tradeguard: grpc log reader failed: {error!r}\n".encode())
            self._drain_raw()
        finally:
            if pending:
                self._passthrough(pending)
            self._events.put(None)

    def _drain_raw(self) -> None:
        """After a failure: forward the rest of the pipe untouched until it closes."""
        with contextlib.suppress(OSError):
            while chunk := os.read(self._read_end, 65536):
                self._passthrough(chunk)

    def _line(self, line: bytes) -> None:
        if line == self._begin:
            self._open_windows += 1
            self._unmatched_probes += 1
            return
        if line == self._end:
            self._open_windows = max(0, self._open_windows - 1)
            self._unmatched_probes = min(self._unmatched_probes, self._open_windows)
            return
        refusal = parse_handshake_line(line)
        if refusal is None:
            self._passthrough(line + b"\n")
            return
        if self._unmatched_probes and refusal.reason == _TLS12_PROBE_REASON:
            self._unmatched_probes -= 1  # one probe, one refusal: any further one is a real client's
            self.probe_lines += 1
            return
        self._event(
            "tls_handshake_refused",
            {
                "reason": refusal.reason,
                "error": refusal.error,
                "detail": refusal.detail,
                "peer": None,
                "grpc_source": refusal.grpc_source,
            },
        )

    def _passthrough(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._saved, view)
                view = view[written:]
        except OSError:
            pass  # the original stderr is gone (EPIPE...): keep draining the pipe, drop what has no reader

    def _event(self, event: str, fields: dict[str, Any]) -> None:
        try:
            self._events.put_nowait((event, fields))
        except queue.Full:
            self.dropped += 1

    # -- the emitter thread: the kit's logging, wherever it writes -----------------------------------------

    def _emit(self) -> None:
        while (item := self._events.get()) is not None:
            event, fields = item
            try:
                _log.warning(event, **fields)
            except Exception:  # noqa: S112 - logging must not end the thread that keeps the pipe moving
                continue

    # -- teardown -----------------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Restore file descriptor 2 and sys.stderr; forward what is still in the pipe."""
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        os.dup2(self._saved, 2)  # the pipe's last write end closes: the reader sees its end
        self._reader.join(timeout)
        self._emitter.join(timeout)
        if self._saved_stderr is not None and sys.stderr is self._direct:
            sys.stderr = self._saved_stderr
        if faulthandler.is_enabled():
            faulthandler.enable(file=sys.stderr)
        with contextlib.suppress(OSError):
            self._direct.flush()
        with contextlib.suppress(OSError):
            os.close(self._read_end)
        with contextlib.suppress(OSError):
            os.close(self._saved)


def _text_stream(fd: int, like: TextIO | None) -> TextIO:
    """A line-buffered text stream on `fd` with the encoding and error handling of `like`."""
    encoding = getattr(like, "encoding", None) or "utf-8"
    errors = getattr(like, "errors", None) or "backslashreplace"
    raw = open(fd, "wb", buffering=0, closefd=False)  # noqa: SIM115 - lives as long as the capture
    return io.TextIOWrapper(raw, encoding=encoding, errors=errors, line_buffering=True, write_through=True)


class _State:
    lock = threading.Lock()
    capture: HandshakeLog | None = None


def install() -> HandshakeLog:
    """Capture grpc core's lines on file descriptor 2 (idempotent). Call it once at start-up, before
    `configure_logging()`, so that Python's own log lines go to the original stderr directly."""
    with _State.lock:
        if _State.capture is None:
            _State.capture = HandshakeLog()
            atexit.register(uninstall, 2.0)
        return _State.capture


def installed() -> HandshakeLog | None:
    return _State.capture


def uninstall(timeout: float = 5.0) -> None:
    """Restore file descriptor 2 (waits up to `timeout` for the pipe to be forwarded)."""
    with _State.lock:
        capture, _State.capture = _State.capture, None
    if capture is not None:
        capture.close(timeout)


@contextlib.contextmanager
def self_probe() -> Iterator[None]:
    """Mark the TLS 1.2 self-probe for the capture (nothing to do when it is not installed)."""
    capture = _State.capture
    if capture is None:
        yield
        return
    with capture.probe_window():
        yield

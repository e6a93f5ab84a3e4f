"""A minimal HTTP/1.1 client for the GET and range GET requests of :mod:`maecore.data.packed.remote`: one kept-alive
connection (plain or TLS), the status line and headers parsed by hand, the body read straight into one buffer.

Why not ``http.client``: it parses every answer's headers with the ``email`` package, ~100 µs of CPU per request, as
much as decoding a small image; here a request costs ~25 µs.  Bodies are ``Content-Length`` or chunked (or read to
the connection's end, HTTP/1.0 style); ``Connection: close`` is honoured.
"""

from __future__ import annotations

import socket
import ssl
from typing import NamedTuple

_READ = 1 << 16


class Response(NamedTuple):
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names
    body: bytes


class Connection:
    """One connection to ``host:port`` (``tls``: HTTPS), opened on the first request and again after the server
    closed it; ``reused``: whether the next request goes over a connection that has already served one."""

    def __init__(self, host: str, port: int, tls: bool, timeout: float) -> None:
        self.host, self.port, self.tls, self.timeout = host, port, tls, timeout
        self.host_header = host if port == (443 if tls else 80) else f"{host}:{port}"
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.served = 0

    @property
    def reused(self) -> bool:
        return self.sock is not None and self.served > 0

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf, self.served = None, bytearray(), 0

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        return sock

    def _fill(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(_READ)
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        self.buf += chunk

    def _line_block(self, end: bytes) -> bytes:
        while (i := self.buf.find(end)) < 0:
            self._fill()
        out = bytes(self.buf[:i])
        del self.buf[:i + len(end)]
        return out

    def _exact(self, n: int) -> bytes:
        if len(self.buf) >= n:
            out = bytes(self.buf[:n])
            del self.buf[:n]
            return out
        out = bytearray(n)
        view = memoryview(out)
        have = len(self.buf)
        view[:have] = self.buf
        self.buf = bytearray()
        assert self.sock is not None
        while have < n:
            got = self.sock.recv_into(view[have:], n - have)
            if not got:
                raise ConnectionResetError(f"the server closed the connection after {have} of {n} bytes")
            have += got
        return bytes(out)

    def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self._line_block(b"\r\n").split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self._line_block(b"\r\n"):  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(self._exact(size))
            self._exact(2)

    def _to_end(self) -> bytes:
        assert self.sock is not None
        while chunk := self.sock.recv(_READ):
            self.buf += chunk
        out, self.buf = bytes(self.buf), bytearray()
        return out

    def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        """``GET path``; raises ``OSError`` (``ConnectionError``, ``TimeoutError`` …) or ``ValueError`` (a garbled
        answer) when the exchange fails, after which the connection is closed."""
        try:
            if self.sock is None:
                self.sock = self._open()
            lines = [f"GET {path} HTTP/1.1", f"Host: {self.host_header}", "User-Agent: mae-toolkit",
                     *(f"{k}: {v}" for k, v in (headers or {}).items())]
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            head = self._line_block(b"\r\n\r\n").decode("latin-1").split("\r\n")
            version, status, *reason = head[0].split(" ", 2)
            fields: dict[str, str] = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
            code = int(status)
            close = fields.get("connection", "").lower() == "close" or version == "HTTP/1.0"
            if "chunked" in fields.get("transfer-encoding", "").lower():
                body = self._chunked()
            elif "content-length" in fields:
                body = self._exact(int(fields["content-length"]))
            elif code in (204, 304) or 100 <= code < 200:
                body = b""
            else:
                body, close = self._to_end(), True
        except (OSError, ValueError):
            self.close()
            raise
        self.served += 1
        if close:
            self.close()
        return Response(code, reason[0] if reason else "", fields, body)

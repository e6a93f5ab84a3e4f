"""A local nginx serving a folder on a loopback port, with range requests (the tests and ``--bench data``'s ``http``
store read packed datasets through it): the system's nginx binary, a config generated in a scratch folder, no root
needed, nothing outside 127.0.0.1.  :func:`nginx_binary` is ``None`` where nginx is not installed (``apt-get install
nginx``); :class:`LocalNginx` raises :class:`NginxUnavailable` (saying why) where it cannot start.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


class NginxUnavailable(RuntimeError):
    """nginx is missing or would not start (the message says why)."""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = """daemon off;
master_process on;
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
    log_format ranges '$request_method $uri $status $http_range';
    access_log {access};
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {extra}
    }}
}}
"""


class LocalNginx:
    """``with LocalNginx(folder) as server: server.url`` serves ``folder`` at ``http://127.0.0.1:PORT``.  ``extra``:
    more directives for the server block (``limit_rate 200k;``, a ``location`` answering 503 …); ``log``: keep an
    access log (``access_log()`` reads its request lines).  :meth:`stop` and :meth:`start` again keep the port."""

    def __init__(self, root: str | Path, scratch: str | Path, extra: str = "", workers: int = 1, log: bool = True) -> None:
        binary = nginx_binary()
        if binary is None:
            raise NginxUnavailable("nginx is not installed (apt-get install nginx)")
        self.binary, self.root, self.tmp = binary, Path(root).resolve(), Path(scratch).resolve()
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra, self.workers, self.log = extra, workers, log
        self.proc: subprocess.Popen | None = None

    def configure(self, extra: str | None = None) -> Path:
        if extra is not None:
            self.extra = extra
        conf = self.tmp / "nginx.conf"
        conf.write_text(CONFIG.format(workers=self.workers, tmp=self.tmp, root=self.root, port=self.port, extra=self.extra,
                                      access=f"{self.tmp}/access.log ranges" if self.log else "off",
                                      user="user root;" if os.geteuid() == 0 else ""))  # root's workers must read the files
        return conf

    def start(self, extra: str | None = None, wait: float = 10.0) -> LocalNginx:
        conf = self.configure(extra)
        self.proc = subprocess.Popen([self.binary, "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace").strip()
                log = (self.tmp / "error.log").read_text(errors="replace").strip() if (self.tmp / "error.log").exists() else ""
                self.proc = None
                raise NginxUnavailable(f"nginx exited at start: {(err or log).splitlines()[-1] if (err or log) else 'no message'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise NginxUnavailable(f"nginx did not listen on 127.0.0.1:{self.port} within {wait:.0f}s")

    def stop(self) -> None:
        """Stop it (its workers too: they are its process group) and wait."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def access_log(self) -> list[str]:
        path = self.tmp / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def __enter__(self) -> LocalNginx:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

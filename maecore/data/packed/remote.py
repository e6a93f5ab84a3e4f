"""Packed datasets in object storage: ``--data_path http(s)://HOST/PATH/pack`` (HTTP range requests over the
standard library's sockets, a kept-alive connection per thread: :mod:`maecore.data.packed.wire`), or ``s3://`` /
``gs://`` … through fsspec where it and its backend are installed (``pip install 'mae-toolkit[remote]' s3fs``).

:class:`RemoteStore` is the :class:`~maecore.data.packed.store.Store` both share; a subclass only fetches one byte range
once (:meth:`RemoteStore._get`).  What it adds to that:

* **read-ahead**: the reader hands over the ranges of a whole batch, in the sampler's order (:meth:`prefetch`); up to
  ``window`` of them are in flight at once on ``threads`` threads of this process, refilled as they are read;
* **coalescing**: ranges of one file less than ``gap`` bytes apart (a shard's neighbouring records: an evaluation
  pass reads in order) go as one request of at most ``max_span`` bytes;
* **retries**: a timeout, a refused or dropped connection, or a 5xx / 408 / 429 answer is tried again after 0.25 s,
  0.5 s, 1 s … (``retries`` more times); a server that stays down is one :class:`~maecore.errors.UserError` naming the
  URL, which the trainer prints as one ``error:`` line (exit 2);
* **cache**: with ``cache_dir``, records that passed their checksum are kept on local disk up to ``cache_size`` bytes
  (:mod:`maecore.data.packed.cache`).

Environment overrides (tests, flaky or far links): ``MAE_REMOTE_RETRIES``, ``MAE_REMOTE_BACKOFF`` (s),
``MAE_REMOTE_TIMEOUT`` (s); ``MAE_REMOTE_THREADS`` (default 4) and ``MAE_REMOTE_WINDOW`` (records in flight, default 32)
per DataLoader worker: a worker needs about its image rate x the round trip in flight (1000 img/s x 30 ms: 32 records on
32 threads); on a near server 4 threads keep up and more only contend for the interpreter (measured on localhost).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from maecore.data.packed.cache import RecordCache
from maecore.data.packed.index import INDEX_NAME, is_url
from maecore.data.packed.store import Range, Store, local_split
from maecore.data.packed.wire import Connection
from maecore.errors import UserError


def _env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass(frozen=True)
class RemoteOptions:
    """How a remote pack is read (the CLIs set ``cache_dir`` and ``cache_size``; the rest rarely needs changing)."""

    cache_dir: str | None = None
    cache_size: int = 10 << 30
    retries: int = field(default_factory=lambda: int(_env("MAE_REMOTE_RETRIES", 6)))
    backoff: float = field(default_factory=lambda: _env("MAE_REMOTE_BACKOFF", 0.25))
    timeout: float = field(default_factory=lambda: _env("MAE_REMOTE_TIMEOUT", 30.0))
    threads: int = field(default_factory=lambda: int(_env("MAE_REMOTE_THREADS", 4)))
    window: int = field(default_factory=lambda: int(_env("MAE_REMOTE_WINDOW", 32)))
    gap: int = 64 << 10
    max_span: int = 8 << 20

    @classmethod
    def from_flags(cls, cfg: Any) -> RemoteOptions:
        """What a task's ``--cache_dir`` / ``--cache_size`` (:func:`maecore.cli.add_cache_args`) ask for."""
        return cls(cache_dir=cfg.cache_dir, cache_size=cfg.cache_size)


class Transient(Exception):
    """A failed try worth another (timeout, connection, 5xx)."""


def spans(ranges: Sequence[Range], gap: int, max_span: int) -> Iterator[tuple[str, int, int, list[Range]]]:
    """(file, start, end, ranges inside) per request: ranges of one file less than ``gap`` apart merged, up to
    ``max_span`` bytes a request."""
    by_file: dict[str, list[Range]] = {}
    for r in ranges:
        by_file.setdefault(r[0], []).append(r)
    for file, rs in by_file.items():
        rs.sort(key=lambda r: r[1])
        start, end, members = rs[0][1], rs[0][1] + rs[0][2], [rs[0]]
        for r in rs[1:]:
            if r[1] - end <= gap and max(end, r[1] + r[2]) - start <= max_span:
                end = max(end, r[1] + r[2])
                members.append(r)
            else:
                yield file, start, end, members
                start, end, members = r[1], r[1] + r[2], [r]
        yield file, start, end, members


class RemoteStore(Store):
    """What every remote store shares: read-ahead, coalescing, retries, the cache (see the module's docstring)."""

    def __init__(self, url: str, options: RemoteOptions | None = None) -> None:
        self.where = url.rstrip("/")
        self.options = options or RemoteOptions()
        self.cache = RecordCache(self.options.cache_dir, self.where, self.options.cache_size) if self.options.cache_dir else None
        self.sizes: dict[str, int] = {}  # the shards' sizes in the index: every answer's total length is checked against them
        self._files: dict[str, bytes | None] = {}
        self._reset()

    def _reset(self) -> None:
        """Per-process state (threads do not survive a fork; a pickled copy starts without)."""
        self._pid = os.getpid()
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[Range, tuple[Future, int]] = {}
        self._planned: deque[Range] = deque()

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_pool", "_ahead", "_planned", "_local")}
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def _process(self) -> None:
        if self._pid != os.getpid():  # a forked copy: the parent's threads and connections are not ours
            self._reset()
            self._forget_connections()

    def _forget_connections(self) -> None:
        """Drop connections inherited from another process (subclasses that keep any)."""

    def _get(self, file: str, offset: int, size: int | None) -> bytes | None:
        """One try at ``size`` bytes of ``file`` from ``offset`` (``size`` ``None``: the whole file); ``None`` for a
        whole file that is not there.  Raises :class:`Transient` for a failure worth another try."""
        raise NotImplementedError

    def _fetch(self, file: str, offset: int, size: int | None) -> bytes | None:
        """:meth:`_get` with retries and backoff; a server that stays down is a :class:`UserError` naming the URL."""
        delay, t0, last = self.options.backoff, time.monotonic(), ""
        tries = max(0, self.options.retries) + 1
        for attempt in range(tries):
            try:
                return self._get(file, offset, size)
            except Transient as e:
                last = str(e)
            if attempt + 1 < tries:
                time.sleep(delay)
                delay = min(2 * delay, 8.0)
        raise UserError(f"{self.name(file)}: no answer after {tries} tries in {time.monotonic() - t0:.1f}s (last: {last})")

    def read_file(self, file: str) -> bytes | None:
        if file not in self._files:
            self._files[file] = self._fetch(file, 0, None)
        return self._files[file]

    def index(self) -> dict[str, Any]:
        index = super().index()
        self._files.pop(INDEX_NAME, None)  # fetched once (open_split asked first); not kept, nor pickled into the workers
        return index

    def check_shard(self, file: str, nbytes: int) -> None:
        self.sizes[file] = nbytes

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, self.options.threads), thread_name_prefix="pack-fetch")
        return self._pool

    def prefetch(self, ranges: Sequence[Range]) -> None:
        self._process()
        for fut, _ in self._ahead.values():  # what an earlier batch fetched and nobody read (it ended early)
            fut.cancel()
        self._ahead.clear()
        self._planned = deque(dict.fromkeys(ranges))
        self._pump(force=True)

    def _pump(self, force: bool = False) -> None:
        """Start fetching planned ranges until ``window`` are in flight (at half a window left, or ``force``)."""
        if not self._planned or (not force and len(self._ahead) > self.options.window // 2):
            return
        todo: list[Range] = []
        while self._planned and len(self._ahead) + len(todo) < self.options.window:
            r = self._planned.popleft()
            if r not in self._ahead and (self.cache is None or not self.cache.has(*r)):
                todo.append(r)
        for file, start, end, members in spans(todo, self.options.gap, self.options.max_span):
            fut = self._executor().submit(self._fetch, file, start, end - start)
            for r in members:
                self._ahead[r] = (fut, r[1] - start)

    def read(self, file: str, offset: int, size: int, fresh: bool = False) -> bytes:
        self._process()
        key = (file, offset, size)
        if not fresh:
            if key not in self._ahead and self._planned and self._planned[0] == key:
                self._pump(force=True)
            got = self._ahead.pop(key, None)
            if got is not None:
                fut, at = got
                data = fut.result()
                self._pump()
                return (data or b"")[at:at + size]
            if self.cache is not None and (data := self.cache.get(*key)) is not None:
                self._pump()
                return data
        elif self.cache is not None:
            self.cache.drop(*key)  # read again after a failed checksum: what the cache held is suspect
        return self._fetch(file, offset, size) or b""

    def keep(self, file: str, offset: int, data: bytes) -> None:
        if self.cache is not None:
            self.cache.put(file, offset, data)

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._reset()
        self._forget_connections()


def content_total(header: str | None) -> int | None:
    """The total length in a ``Content-Range: bytes a-b/total`` header (``None``: absent or ``*``)."""
    total = (header or "").rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


class HttpStore(RemoteStore):
    """A packed folder served over HTTP(S) by any server that answers range requests (nginx, S3's and GCS's HTTPS
    endpoints for public or presigned objects, a CDN).  One kept-alive connection per thread
    (:class:`~maecore.data.packed.wire.Connection`); a connection the server closed while idle is opened again at once
    (not counted as a try)."""

    def __init__(self, url: str, options: RemoteOptions | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"{url}: not an http(s)://HOST/PATH URL")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise UserError(f"{url}: {e}") from None
        self.host, self.port, self.tls, self.base = parts.hostname, port, parts.scheme == "https", parts.path.rstrip("/")
        self._forget_connections()
        super().__init__(url, options)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in super().__getstate__().items() if k not in ("_conns", "_conns_pid")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._conns_pid = None  # the connections were the pickling process's
        self._forget_connections()

    def _forget_connections(self) -> None:
        """Close this process's connections (a forked copy's inherited ones are the parent's: only forgotten)."""
        if getattr(self, "_conns_pid", None) == os.getpid():
            for conn in self._conns:
                conn.close()
        self._local, self._conns, self._conns_pid = threading.local(), [], os.getpid()

    def _connection(self) -> Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = Connection(self.host, self.port, self.tls, self.options.timeout)
            self._conns.append(conn)
        return conn

    def _get(self, file: str, offset: int, size: int | None) -> bytes | None:
        url = self.name(file)
        if size is not None and size <= 0:
            return b""
        headers = {} if size is None else {"Range": f"bytes={offset}-{offset + size - 1}"}
        conn = self._connection()
        while True:
            reused = conn.reused
            try:
                r = conn.get(f"{self.base}/{quote(file)}", headers)
                break
            except (OSError, ValueError) as e:
                if reused and not isinstance(e, TimeoutError):
                    continue  # the server closed an idle kept-alive connection: a new one, at once
                raise Transient(f"{type(e).__name__}: {e}") from None
        status = r.status
        if status >= 500 or status in (408, 429):
            raise Transient(f"HTTP {status} {r.reason}")
        if status == 404 and size is None:
            return None
        if status == 404:
            raise UserError(f"{url}: not found (HTTP 404): a file its {INDEX_NAME} lists is missing")
        if status == 416:
            return b""  # the range starts past the file's end: a short read, which the reader refuses
        if size is None and status == 200:
            return r.body
        if status == 200:
            raise UserError(f"{url}: the server answered a range request with the whole file (HTTP 200): it needs range support")
        if status != 206:
            raise UserError(f"{url}: HTTP {status} {r.reason}")
        total, want = content_total(r.headers.get("content-range")), self.sizes.get(file)
        if want is not None and total is not None and total != want:
            raise UserError(f"{url}: {total} bytes, the index records {want}: a truncated or replaced shard (pack it again)")
        return r.body


class FsspecStore(RemoteStore):
    """A packed folder in an object store fsspec reaches (``s3://``, ``gs://``, ``az://`` …), read with
    ``cat_file(path, start, end)``; the backend's credentials come from its usual places (environment, config files)."""

    def __init__(self, url: str, options: RemoteOptions | None = None) -> None:
        scheme = url.split("://", 1)[0]
        try:
            import fsspec

            fsspec.filesystem(scheme)
        except ImportError as e:
            raise UserError(f"{url}: reading {scheme}:// needs fsspec and its {scheme} backend ({e}; "
                            f"pip install 'mae-toolkit[remote]' and the backend, e.g. s3fs or gcsfs)") from None
        except ValueError as e:
            raise UserError(f"{url}: {e}") from None
        self.scheme = scheme
        super().__init__(url, options)

    def _get(self, file: str, offset: int, size: int | None) -> bytes | None:
        import fsspec

        fs = fsspec.filesystem(self.scheme)  # fsspec caches the instance (one per process and options)
        path = self.name(file)
        try:
            return fs.cat_file(path) if size is None else fs.cat_file(path, start=offset, end=offset + size)
        except FileNotFoundError:
            if size is None:
                return None
            raise UserError(f"{path}: not found: a file its {INDEX_NAME} lists is missing") from None
        except PermissionError as e:
            raise UserError(f"{path}: access denied ({e})") from None
        except Exception as e:  # the backends raise their own kinds for timeouts and throttling
            raise Transient(f"{type(e).__name__}: {e}") from None


def remote_store(url: str, options: RemoteOptions | None = None) -> RemoteStore:
    """The store for a URL: HTTP(S) through the standard library, other schemes through fsspec."""
    scheme = url.split("://", 1)[0].lower()
    return HttpStore(url, options) if scheme in ("http", "https") else FsspecStore(url, options)


def open_split(location: str | Any, options: RemoteOptions | None = None) -> Store | None:
    """The packed folder at ``location`` (a path, or a URL whose folder holds a packed index), else ``None``."""
    if not is_url(location):
        return local_split(location)
    store = remote_store(location, options)
    return store if store.read_file(INDEX_NAME) is not None else None


def find_split(location: str, subs: Sequence[str], options: RemoteOptions | None = None) -> Store:
    """The first packed folder among ``location/sub`` for ``sub`` in ``subs`` (``""``: ``location`` itself); one-line
    :class:`UserError` when none has an index."""
    for sub in subs:
        store = open_split(f"{location.rstrip('/')}/{sub}" if sub else location, options)
        if store is not None:
            return store
    names = " nor ".join(f"{location.rstrip('/')}/{sub + '/' if sub else ''}{INDEX_NAME}" for sub in subs)
    raise UserError(f"no packed dataset at {location}: neither {names} exists" if len(subs) > 1
                    else f"no packed dataset at {location}: {names} does not exist")

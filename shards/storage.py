"""fsspec access to local paths and object storage (s3:// through s3fs).

Every stage reads and writes through these helpers: URLs are joined as strings (never
os.path on a URL), writes are atomic (a temporary name, then a rename or one whole
upload), and failures of the store itself (unreachable endpoint, missing bucket, bad
credentials) become one :class:`StorageError` naming the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import uuid
from typing import Iterator

import fsspec

from shards.errors import StorageError

log = logging.getLogger(__name__)

# Large sequential reads from s3fs: a bigger block size with the read-ahead cache.
S3_READ_OPTIONS = {"block_size": 16 * 2**20, "cache_type": "readahead"}


# scheme://user:password@host -> scheme://***@host, for every URL in a text; a password may
# hold "/" (S3 secret keys do), so a URL with "@" in its path is masked too (more, never less)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@'\"]+:[^\s@'\"]*|[^/\s@'\"]+)@")


def mask_secrets(text: str, *urls: str) -> str:
    """``text`` with the credentials of every URL in it replaced: ``http://***@host:5000``; the
    credentials of ``urls`` are also hidden where ``text`` quotes them without their scheme
    (``Invalid bucket name "key:secret@bucket"``).

    For what is logged, shown or stored as a param, tag or artifact; connections use the URL itself.
    """
    for url in urls:
        m = _USERINFO.search(url)
        if m:
            text = text.replace(m["userinfo"], "***")
    return _USERINFO.sub(r"\g<scheme>***@", text)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a URL or local path."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise StorageError(mask_secrets(f"cannot open storage URL {url!r}: {e}", url)) from None
    return fs, path


def _describe(url: str, e: BaseException) -> StorageError:
    hint = ""
    if url.startswith("s3://"):
        hint = (
            " Check the endpoint (AWS_ENDPOINT_URL), the bucket name and the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."
        )
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    return StorageError(mask_secrets(f"storage error at {url!r}: {type(e).__name__}: {e}.{hint}", url, endpoint))


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn the store's own exceptions into one StorageError naming the URL."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise
    except (OSError, PermissionError, ConnectionError, TimeoutError) as e:
        raise _describe(url, e) from None
    except Exception as e:  # botocore / aiohttp errors do not share a base class with OSError
        mod = type(e).__module__
        if mod.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs")):
            raise _describe(url, e) from None
        raise


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    with storage_errors(url):
        fs.invalidate_cache(path)  # another process may have written or removed it
        return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with storage_errors(url):
        with fs.open(path, "rb") as f:
            return f.read()


def read_many(urls: list[str]) -> list[bytes | FileNotFoundError]:
    """Contents of several objects of one store, fetched concurrently on async stores (s3).

    A missing object gives FileNotFoundError in its place; any other failure of the store
    raises StorageError.
    """
    if not urls:
        return []
    fs, _ = filesystem(urls[0])
    paths = [filesystem(u)[1] for u in urls]
    with storage_errors(urls[0]):
        if getattr(fs, "async_impl", False):
            from fsspec.asyn import sync

            async def fetch_all() -> list:
                return await asyncio.gather(*(fs._cat_file(p) for p in paths), return_exceptions=True)

            got = sync(fs.loop, fetch_all)
        else:
            got = []
            for p in paths:
                try:
                    got.append(fs.cat_file(p))
                except FileNotFoundError as e:
                    got.append(e)
        for url, g in zip(urls, got):
            if isinstance(g, BaseException) and not isinstance(g, FileNotFoundError):
                raise _describe(url, g) if not isinstance(g, StorageError) else g
    return got


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object atomically: a local file goes to a temporary name and is renamed;
    an object-store upload is a single PUT that either completes or leaves nothing."""
    fs, path = filesystem(url)
    with storage_errors(url):
        if is_remote(url):
            fs.pipe_file(path, data)
            return
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def put_file(local_path: str, url: str) -> None:
    """Commit a finished local file to ``url`` (rename locally, one upload remotely)."""
    fs, path = filesystem(url)
    with storage_errors(url):
        if is_remote(url):
            fs.put_file(local_path, path)
            os.remove(local_path)
        else:
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            os.replace(local_path, path)


def listdir(url: str) -> list[str]:
    """Names (not full paths) of the entries directly under ``url``; [] when it does not exist."""
    fs, path = filesystem(url)
    with storage_errors(url):
        try:
            names = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
    return sorted(os.path.basename(p.rstrip("/")) for p in names)


def list_sizes(url: str) -> dict[str, int]:
    """Name -> size of the files directly under ``url``; {} when it does not exist."""
    fs, path = filesystem(url)
    with storage_errors(url):
        try:
            entries = fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
    return {
        os.path.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
        for e in entries
        if e.get("type") == "file"
    }


def remove(url: str) -> None:
    fs, path = filesystem(url)
    with storage_errors(url):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def open_read(url: str):
    """A readable binary file object (streaming, with read-ahead on s3)."""
    fs, path = filesystem(url)
    with storage_errors(url):
        if url.startswith("s3://"):
            return fs.open(path, "rb", **S3_READ_OPTIONS)
        return fs.open(path, "rb")


def check_writable(url: str) -> None:
    """Fail early, before any work, when ``url`` cannot be written (bucket, credentials, endpoint).

    Creates nothing that stays: a local folder that does not exist yet is not created here
    (its nearest existing parent must be a writable folder); elsewhere a probe object is
    written and removed.
    """
    if not is_remote(url):
        _, path = filesystem(url)
        parent = os.path.abspath(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise StorageError(mask_secrets(f"cannot write to {url!r}: {parent!r} is not a writable folder", url))
        if parent != os.path.abspath(path):
            return
    probe = join(url, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"ok")
    except FileNotFoundError as e:
        raise StorageError(
            mask_secrets(f"cannot write to {url!r}: {e}. Create the bucket (or folder), or fix the URL.", url)
        ) from None
    fs, path = filesystem(probe)
    with storage_errors(probe):
        fs.rm_file(path)


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode.startswith("r"):
        return open_read(url)
    fs, path = filesystem(url)
    return fs.open(path, mode)


def register_webdataset_schemes() -> None:
    """Let webdataset open s3:// URLs through s3fs (call at import time of modules that stream)."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the package re-exports a function of that name

    gopen.gopen_schemes["s3"] = _gopen_fsspec

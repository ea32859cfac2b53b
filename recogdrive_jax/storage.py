"""Where a run's files go: local directories or object-store URLs (`gs://bucket/run`, `s3://...`), in one place.

Every workdir, checkpoint, metrics, config, cache and export path goes through here, so a remote URL reaches the
libraries' own drivers (etils.epath over fsspec/gcsfs for files, Orbax and TensorStore's `gcs`/`s3` kvstores for
arrays) and never becomes a local directory named `gs:`. Paths stay plain strings everywhere else; `join` keeps
URLs URLs and `abspath` leaves them alone.

Object stores have no directories and no rename or append: `makedirs` is a no-op there, `write_text` writes the
object whole (it appears atomically when the upload ends, as a local tmp+rename does), `append_text` rewrites the
object, and writers that only take local paths (matplotlib, `save_pretrained`, `np.savez`) write into
`staged_dir`, which uploads on exit.

Emulators: with `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` (what gcsfs and google-cloud-storage read) this module
also points TensorStore's `gcs` driver there (`TENSORSTORE_GCS_HTTP_URL`), lets gcsfs connect anonymously and turns off
gcsfs's bucket-layout probe (a gRPC control-plane call no emulator serves), unless those are set already.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import re
import socket
import tempfile
import threading
import time
import urllib.parse
import uuid
from typing import Iterator

from etils import epath

from recogdrive_jax.errors import UserError

CHECK_TIMEOUT_S = 7.0  # start-up reachability check; the whole start-up failure stays under 10 s
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")


class StorageError(UserError):
    """A storage URL that cannot be used (no driver, unreachable, not writable); one line naming the URL."""


def _configure_fsspec() -> None:
    """No listing cache: a directory listed before another writer (or a move) changed it would be stale."""
    try:
        import fsspec.config
    except ImportError:
        return
    for name in ("gcs", "gs", "s3"):
        fsspec.config.conf.setdefault(name, {}).setdefault("use_listings_cache", False)


def configure_emulator() -> None:
    """Points TensorStore and gcsfs at `STORAGE_EMULATOR_HOST` when it is set (see the module docstring)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if not host or host == "default":
        return
    url = host if host.startswith(("http://", "https://")) else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        import fsspec.config
        for name in ("gcs", "gs"):
            fsspec.config.conf.setdefault(name, {}).setdefault("token", "anon")
    except ImportError:
        pass


_configure_fsspec()
configure_emulator()


def scheme(path) -> str | None:
    """'gs' for `gs://b/x`, None for a local path (also for `file://`)."""
    m = _URL.match(os.fspath(path))
    if not m or m.group(1).lower() == "file":
        return None
    return m.group(1).lower()


def is_remote(path) -> bool:
    return scheme(path) is not None


def _strip_file(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def abspath(path) -> str:
    """Absolute local path, or the URL itself (normalised: no trailing slash, no `//` inside)."""
    path = os.fspath(path)
    if is_remote(path):
        s, rest = _URL.match(path).groups()
        return f"{s.lower()}://{posixpath.normpath('/' + rest).lstrip('/')}"
    return os.path.abspath(_strip_file(path))


def join(base, *parts) -> str:
    base = os.fspath(base)
    if is_remote(base):
        return posixpath.join(base, *[os.fspath(p) for p in parts])
    return os.path.join(_strip_file(base), *parts)


def dirname(path) -> str:
    path = os.fspath(path).rstrip("/")
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def basename(path) -> str:
    return posixpath.basename(os.fspath(path).rstrip("/"))


def as_path(path) -> epath.Path:
    """An `epath.Path` (gs:// through gcsfs, local through os), the type Orbax takes."""
    return epath.Path(abspath(path))


def _needs_driver(path: str) -> None:
    s = scheme(path)
    if s is None:
        return
    pkg = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}.get(s)
    if pkg is None:
        raise StorageError(f"{path}: unsupported storage scheme {s!r}://; use a local path, gs:// or s3://")
    import importlib.util
    if importlib.util.find_spec(pkg) is None:
        extra = "  (pip install 'recogdrive_jax[gcs]')" if s == "gs" else ""
        raise StorageError(f"{path}: {s}:// needs the {pkg} package{extra}")


# ---- files ------------------------------------------------------------------------------------------------------
def exists(path) -> bool:
    return as_path(path).exists()


def isdir(path) -> bool:
    return as_path(path).is_dir()


def isfile(path) -> bool:
    p = as_path(path)
    return p.is_file() if not is_remote(path) else (p.exists() and not p.is_dir())


def listdir(path) -> list[str]:
    """Entry names of a directory ([] when it does not exist)."""
    p = as_path(path)
    if not p.is_dir():
        return []
    return sorted(c.name for c in p.iterdir())


def makedirs(path) -> None:
    """A local directory (and parents); nothing on an object store, where directories are key prefixes."""
    if not is_remote(path):
        os.makedirs(abspath(path), exist_ok=True)


def read_bytes(path) -> bytes:
    """The whole file. Remote: one GET of the whole object (fsspec `cat_file`), not a buffered read: fsspec's
    buffered files read ahead in a background prefetcher, which was seen to hang on a small object in the full test
    suite (waiting forever on its event)."""
    path = abspath(path)
    if is_remote(path):
        _needs_driver(path)
        import fsspec
        fs, p = fsspec.core.url_to_fs(path)
        return fs.cat_file(p)
    with open(path, "rb") as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path, data: bytes) -> None:
    """Atomic: a reader sees the old or the new content, never a partial file (local: tmp + rename; an object store
    publishes an object only when its upload completes). Creates local parent directories."""
    path = abspath(path)
    if is_remote(path):
        as_path(path).write_bytes(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_text(path, text: str) -> None:
    """Appends `text`; an object store cannot append, so the object is read and rewritten (small files only)."""
    path = abspath(path)
    if not is_remote(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
        return
    old = read_text(path) if exists(path) else ""
    write_text(path, old + text)


@contextlib.contextmanager
def open_file(path, mode: str = "rb"):
    """`open` for either kind of path ('r', 'rb', 'w', 'wb'); a remote write is uploaded when the file closes, a
    remote read is one whole-object GET (see `read_bytes`)."""
    if is_remote(path) and "r" in mode:
        data = read_bytes(path)
        yield io.BytesIO(data) if "b" in mode else io.StringIO(data.decode("utf-8"))
        return
    with as_path(path).open(mode) as f:
        yield f


def remove(path) -> None:
    p = as_path(path)
    if p.exists():
        p.unlink()


def rmtree(path) -> None:
    p = as_path(path)
    if p.exists():
        p.rmtree()


def move(src, dst) -> None:
    """Moves a file or a directory tree (object store: copy + delete of every object under `src`)."""
    src, dst = abspath(src), abspath(dst)
    if not is_remote(src) and not is_remote(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        return
    import fsspec
    fs, _ = fsspec.core.url_to_fs(src)
    if fs.isdir(src):  # server-side copies, then the deletes (not every server has GCS's moveTo)
        fs.copy(src.rstrip("/") + "/", dst.rstrip("/") + "/", recursive=True)
        fs.rm(src, recursive=True)
    else:
        fs.copy(src, dst)
        fs.rm(src)


def tree_size(path) -> int:
    """Bytes of every file under `path`."""
    path = abspath(path)
    if is_remote(path):
        import fsspec
        fs, _ = fsspec.core.url_to_fs(path)
        return int(fs.du(path, total=True)) if fs.exists(path) else 0
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def upload_tree(local_dir: str, dst) -> None:
    """Copies every file under the local `local_dir` to `dst` (same relative paths)."""
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        for name in files:
            target = join(dst, name) if rel == "." else join(dst, *rel.split(os.sep), name)
            with open(os.path.join(root, name), "rb") as f:
                write_bytes(target, f.read())


@contextlib.contextmanager
def staged_dir(dst) -> Iterator[str]:
    """A local directory to write `dst`'s files into: `dst` itself when local; else a temporary directory whose
    files are uploaded to `dst` when the block ends without an exception."""
    dst = abspath(dst)
    if not is_remote(dst):
        os.makedirs(dst, exist_ok=True)
        yield dst
        return
    with tempfile.TemporaryDirectory(prefix="recogdrive_stage_") as tmp:
        yield tmp
        upload_tree(tmp, dst)


@contextlib.contextmanager
def staged_file(dst) -> Iterator[str]:
    """A local file path to write `dst` to (`dst` itself when local, parents created); uploaded on exit."""
    dst = abspath(dst)
    if not is_remote(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        yield dst
        return
    with tempfile.TemporaryDirectory(prefix="recogdrive_stage_") as tmp:
        local = os.path.join(tmp, basename(dst))
        yield local
        with open(local, "rb") as f:
            write_bytes(dst, f.read())


def local_scratch(workdir, *parts, process: int) -> str:
    """A local directory for files a run on a remote `workdir` regenerates rather than stores (synthetic training
    data rendered from a seed): under the temp directory ($TMPDIR), keyed by the URL and the process index
    (`jax.process_index()`: every host regenerates its own copy), so a rerun on the same machine reuses it and
    processes sharing a machine do not collide. Not created here."""
    key = hashlib.sha256(abspath(workdir).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "recogdrive_jax", key, *parts, f"process_{process}")


@contextlib.contextmanager
def local_copy(path, skip: tuple[str, ...] = ()) -> Iterator[str]:
    """A local path holding `path`'s content (a remote file or directory tree is downloaded to a temp dir), for
    readers that only take local paths (transformers' from_pretrained). `skip`: glob patterns of file names (and
    sub-directory names) left out of a remote tree, e.g. the weights when only a checkpoint's tokenizer is read."""
    path = abspath(path)
    if not is_remote(path):
        yield path
        return
    import fnmatch

    import fsspec
    with tempfile.TemporaryDirectory(prefix="recogdrive_fetch_") as tmp:
        fs, _ = fsspec.core.url_to_fs(path)
        local = os.path.join(tmp, basename(path))
        if not skip or not fs.isdir(path):
            fs.get(path, local, recursive=True)
        else:
            root = fs._strip_protocol(path).rstrip("/")
            for f in fs.find(path):
                rel = fs._strip_protocol(f)[len(root):].lstrip("/")
                if any(fnmatch.fnmatch(part, pat) for part in rel.split("/") for pat in skip):
                    continue
                os.makedirs(os.path.dirname(os.path.join(local, rel)), exist_ok=True)
                fs.get_file(f, os.path.join(local, rel))
            os.makedirs(local, exist_ok=True)
        yield local


# ---- TensorStore --------------------------------------------------------------------------------------------------
def tensorstore_kvstore(path) -> dict:
    """TensorStore kvstore spec of a directory: `gcs` for gs://, `s3` for s3://, `file` otherwise."""
    path = abspath(path)
    s = scheme(path)
    if s is None:
        return {"driver": "file", "path": path}
    bucket, _, key = _URL.match(path).group(2).partition("/")
    key = key.strip("/")
    if s == "gs":
        driver = "gcs"
    elif s == "s3":
        driver = "s3"
    else:
        raise StorageError(f"{path}: TensorStore has no driver for {s}://; use gs://, s3:// or a local path")
    return {"driver": driver, "bucket": bucket, "path": key + "/" if key else ""}


# ---- start-up check -----------------------------------------------------------------------------------------------
def _endpoint(path: str) -> tuple[str, int, str] | None:
    """(host, port, how to name it) that a gs:// URL's requests go to: the emulator or Google's endpoint."""
    if scheme(path) != "gs":
        return None
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator and emulator != "default":
        u = urllib.parse.urlsplit(emulator if "://" in emulator else f"http://{emulator}")
        return u.hostname or "localhost", u.port or (443 if u.scheme == "https" else 80), \
            f"STORAGE_EMULATOR_HOST={emulator}"
    return "storage.googleapis.com", 443, "storage.googleapis.com:443"


def check_writable(path, timeout_s: float = CHECK_TIMEOUT_S) -> str:
    """Returns `abspath(path)` after writing and deleting a small marker there; a remote URL that cannot be reached
    within `timeout_s` (no network, no credentials, no bucket) is a `StorageError` naming it. Local directories
    are created."""
    path = abspath(path)
    if not is_remote(path):
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".write_probe.{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise StorageError(f"{path!r} is not writable: {e.strerror or e}") from None
        return path
    _needs_driver(path)
    t0 = time.monotonic()
    endpoint = _endpoint(path)
    if endpoint is not None:  # fail fast (no DNS, nothing listening) instead of waiting out the client's retries
        host, port, name = endpoint
        try:
            socket.create_connection((host, port), timeout=max(timeout_s / 2, 0.5)).close()
        except OSError as e:
            raise StorageError(f"{path} cannot be reached: no connection to {name} "
                               f"({e.strerror or type(e).__name__})") from None
    marker = join(path, f".write_probe.{uuid.uuid4().hex[:12]}")
    outcome: dict = {}

    def probe():
        try:
            p = as_path(marker)
            p.write_text("ok")
            p.unlink()
            outcome["ok"] = True
        except BaseException as e:  # noqa: BLE001  (reported by the caller, one line)
            outcome["error"] = e

    thread = threading.Thread(target=probe, name="storage-check", daemon=True)
    thread.start()
    thread.join(max(timeout_s - (time.monotonic() - t0), 0.5))
    if "ok" in outcome:
        return path
    where = os.environ.get("STORAGE_EMULATOR_HOST")
    via = f" (via STORAGE_EMULATOR_HOST={where})" if where and scheme(path) == "gs" else ""
    if "error" in outcome:
        e = outcome["error"]
        text = " ".join(str(e).split())[:200] or type(e).__name__
        raise StorageError(f"{path} is not writable{via}: {type(e).__name__}: {text}")
    raise StorageError(f"{path} cannot be reached{via}: writing a marker object did not finish within "
                       f"{time.monotonic() - t0:.0f} s (network, credentials or bucket name?)")

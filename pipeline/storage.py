"""Where a dataset lives: a local path, a shared-filesystem path, or a URI on any pyarrow filesystem.

``location(x)`` turns what a user wrote (``output.dir``, ``synthgen verify OUT``, the loader's dirs)
into a path object the format code uses the same way everywhere:

* a local path (or ``file://``): a :class:`pathlib.Path`, used exactly as before (fsync, ``os.replace``);
* a URI (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``): a :class:`RemotePath` over
  ``pyarrow.fs.FileSystem.from_uri`` (fsspec, wrapped as a pyarrow filesystem, only for schemes pyarrow
  lacks). Credentials come from the filesystem's own chain (environment, ``~/.aws``, instance roles,
  ``GOOGLE_APPLICATION_CREDENTIALS``...); an S3 endpoint from ``AWS_ENDPOINT_URL_S3`` /
  ``AWS_ENDPOINT_URL``. A URI that carries credentials or options (``user:secret@``, ``?query``) is
  refused: the job file and the manifest never hold them.

Publishing a file (:func:`staging` then :func:`publish`): on a local or POSIX filesystem it is written
under ``NAME.tmp`` and renamed; on an object store, where a rename is a copy, it is written under its
final name at once (a PUT is all or nothing) and the commit is the manifest / journal record alone:
an object no record names is garbage that the next run replaces, and no reader opens it.

Must not: import Ray, torch or stage code.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from .spec import UsageError

#: ``scheme://`` at the start of a string (a Windows drive ``C:\\`` has no ``//``)
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
#: query keys of pyarrow / fsspec URIs that are secrets
_SECRET_KEYS = ("access_key", "secret_key", "session_token", "password", "token", "key", "secret", "credentials")


class OutputError(UsageError):
    """The output directory cannot be used (one-line message)."""


def is_uri(text: Any) -> bool:
    """Whether ``text`` is a ``scheme://`` URI other than ``file://`` (which is a local path)."""
    m = _URI.match(str(text)) if isinstance(text, str) else None
    return bool(m) and m.group(1).lower() != "file"


def redact(uri: str) -> str:
    """``uri`` fit for a message: any ``user:secret@`` and query replaced by ``***``."""
    parts = urlsplit(uri)
    netloc = ("***@" + parts.netloc.rsplit("@", 1)[1]) if "@" in parts.netloc else parts.netloc
    return f"{parts.scheme}://{netloc}{parts.path}" + ("?***" if parts.query else "")


def uri_problem(uri: str) -> str:
    """'' when ``uri`` may be used as a dataset location, else why not (credentials or options in it)."""
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        return ("it carries credentials (user:secret@); give them through the environment or the filesystem's "
                "config (AWS_ACCESS_KEY_ID / ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, ...)")
    if parts.query or parts.fragment:
        names = sorted({k.split("=", 1)[0] for k in parts.query.split("&") if k})
        secret = any(k.lower() in _SECRET_KEYS for k in names)
        return (("it carries credentials" if secret else f"it carries options ({', '.join(names)})")
                + "; give them through the environment (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION, "
                "~/.aws/config) so the job file and the manifest never hold them")
    if not parts.netloc:
        return "it names no bucket or host (scheme://bucket/prefix)"
    return ""


# --- filesystems ---------------------------------------------------------------------------------
_FILESYSTEMS: dict[str, tuple[Any, Any]] = {}
_LOCK = threading.Lock()
#: environment that selects the endpoint / account a filesystem talks to (its cache key, never recorded)
_ENV_KEYS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
             "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST")


def _filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of a URI; one filesystem per scheme and bucket per process."""
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    root = f"{scheme}://{parts.netloc}"
    key = "|".join([root, *(os.environ.get(name, "") for name in _ENV_KEYS)])  # another endpoint: another fs
    with _LOCK:
        entry = _FILESYSTEMS.get(key)
        if entry is None:
            try:
                entry = (pafs.FileSystem.from_uri(root)[0], None)
            except Exception as e:  # noqa: BLE001 - pyarrow: unknown scheme, or cannot configure it
                if "Unrecognized filesystem type" not in str(e):
                    raise OutputError(f"{uri}: cannot open its filesystem ({_first_line(e)})") from None
                entry = _fsspec(uri, scheme)
            _FILESYSTEMS[key] = entry
    fs, impl = entry
    if impl is not None:  # fsspec's own path form (memory://b/x -> /b/x)
        return fs, impl._strip_protocol(uri).rstrip("/")
    return fs, (parts.netloc + parts.path).rstrip("/")


def _fsspec(uri: str, scheme: str) -> tuple[Any, Any]:
    """A pyarrow filesystem over fsspec's implementation of ``scheme`` (memory://, az://, ...)."""
    import pyarrow.fs as pafs

    try:
        import fsspec

        impl = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as e:
        raise OutputError(f"{uri}: no filesystem for scheme {scheme!r} ({_first_line(e)}); use a local path, a "
                          "shared-filesystem path or an s3:// / gs:// / hdfs:// URI") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(impl)), impl


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def location(where: str | os.PathLike | RemotePath) -> Path | RemotePath:
    """A dataset location as the format code uses it: :class:`pathlib.Path` for a local path (or a
    ``file://`` URI), :class:`RemotePath` for a URI. Raises OutputError for a URI that carries
    credentials or options, or whose scheme no filesystem serves."""
    if isinstance(where, (Path, RemotePath)):
        return where
    text = os.fspath(where)
    if not is_uri(text):
        if text.lower().startswith("file://"):
            return Path(urlsplit(text).path)
        return Path(text)
    problem = uri_problem(text)
    if problem:
        raise OutputError(f"{redact(text)}: {problem}")
    fs, path = _filesystem(text)
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    scheme = urlsplit(text).scheme.lower()
    return RemotePath(fs, path, scheme)


def is_remote(path: Any) -> bool:
    return isinstance(path, RemotePath)


class _Stat:
    def __init__(self, size: int):
        self.st_size = size


class RemotePath:
    """A file or prefix on a non-local pyarrow filesystem, with the slice of :class:`pathlib.Path` that
    the format code uses (``/``, ``name``, ``exists``, ``is_file``, ``is_dir``, ``iterdir``, ``stat``,
    ``read_bytes``, ``write_bytes``, ``unlink``, ``open``). ``str()`` is the URI (no secrets: a URI with
    credentials never gets this far). Picklable (pyarrow filesystems are), so readers can ship it."""

    __slots__ = ("_type", "fs", "path", "scheme")

    def __init__(self, fs: Any, path: str, scheme: str, _type: Any = None):
        self.fs, self.path, self.scheme, self._type = fs, path.rstrip("/"), scheme, _type

    def __reduce__(self):
        return (RemotePath, (self.fs, self.path, self.scheme))

    # --- names -----------------------------------------------------------------------------------
    def __truediv__(self, other: str) -> RemotePath:
        return RemotePath(self.fs, f"{self.path}/{str(other).strip('/')}", self.scheme)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path.lstrip('/')}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __fspath__(self) -> str:  # refuse to be taken for a local path by open() / os.* by mistake
        raise TypeError(f"{self} is not a local path")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and (self.scheme, self.path) == (other.scheme, other.path)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path))

    def __lt__(self, other: RemotePath) -> bool:
        return (self.scheme, self.path) < (other.scheme, other.path)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.fs, str(PurePosixPath(self.path).parent), self.scheme)

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def resolve(self) -> RemotePath:
        return self

    def is_relative_to(self, other: Any) -> bool:
        return isinstance(other, RemotePath) and (self.path + "/").startswith(other.path.rstrip("/") + "/")

    # --- queries ---------------------------------------------------------------------------------
    def _info(self):
        import pyarrow.fs as pafs

        if self._type is not None:
            return self._type
        return self.fs.get_file_info(self.path).type if self.path else pafs.FileType.Directory

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info() == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info() == pafs.FileType.Directory

    def iterdir(self) -> Iterator[RemotePath]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            yield RemotePath(self.fs, info.path, self.scheme, info.type)

    def stat(self) -> _Stat:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(self))
        return _Stat(int(info.size or 0))

    # --- bytes -----------------------------------------------------------------------------------
    def open(self, mode: str = "rb"):
        """``rb``: a seekable file (ranged reads); ``wb``: an output stream (the object appears when it closes)."""
        if mode == "rb":
            try:
                return self.fs.open_input_file(self.path)
            except FileNotFoundError:
                raise
            except OSError:
                if not self.exists():
                    raise FileNotFoundError(str(self)) from None
                raise
        if mode == "wb":
            return self.fs.open_output_stream(self.path)
        raise ValueError(f"RemotePath.open: mode {mode!r} (only rb, wb)")

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)
        _APPENDED.pop(str(self), None)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def append_bytes(self, data: bytes) -> None:
        """Objects cannot be appended to: the object is rewritten whole (this process remembers what it
        holds, so it is read at most once). A PUT is atomic: a reader sees the old or the new object."""
        key = str(self)
        current = _APPENDED.get(key)
        if current is None:
            try:
                current = self.read_bytes()
            except FileNotFoundError:
                current = b""
        current += data
        self.write_bytes(current)
        _APPENDED[key] = current

    def unlink(self, missing_ok: bool = False) -> None:
        _APPENDED.pop(str(self), None)
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError:
            if self.exists() or not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no directories: nothing to make (a marker object would be a file we own)."""


#: journal objects this process wrote, by URI (what :meth:`RemotePath.append_bytes` appends to)
_APPENDED: dict[str, bytes] = {}


# --- file helpers used by the format code (Path or RemotePath) -------------------------------------
def write_file(path: Path | RemotePath, data: bytes) -> None:
    """Write ``data`` to ``path`` as it is (local: write + fsync; no rename)."""
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def staging(path: Path | RemotePath) -> Path | RemotePath:
    """Where a file to be published at ``path`` is written first: ``NAME.tmp`` locally; on an object
    store the final name itself (an uncommitted object is garbage, never read)."""
    return path if isinstance(path, RemotePath) else path.with_name(path.name + ".tmp")


def publish(staged: Path | RemotePath, path: Path | RemotePath) -> None:
    """Make a staged file visible under its name: ``os.replace`` locally, nothing on an object store."""
    if staged != path:
        os.replace(staged, path)


def write_atomic(path: Path | RemotePath, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: local ``path.tmp`` + fsync + os.replace; an object PUT."""
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write_file(tmp, data)
    os.replace(tmp, path)


def append_durable(path: Path | RemotePath, data: bytes) -> None:
    """Append ``data`` (local: O_APPEND + fsync; object store: the object rewritten whole)."""
    if isinstance(path, RemotePath):
        path.append_bytes(data)
        return
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def digest(data: bytes) -> dict[str, Any]:
    """{"bytes", "sha256"} of bytes about to be written (so nobody reads them back to hash them)."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def sha256(path: Path | RemotePath) -> str:
    """sha256 (hex) of a file's bytes, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with (path.open("rb") if isinstance(path, RemotePath) else open(path, "rb")) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_parquet(path: Path | RemotePath, **kwargs: Any):
    import pyarrow.parquet as pq

    if isinstance(path, RemotePath):
        return pq.read_table(path.path, filesystem=path.fs, **kwargs)
    return pq.read_table(path, **kwargs)


def parquet_bytes(table: Any) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_parquet(tables: Iterable[Any], path: Path | RemotePath, schema: Any) -> None:
    """Write tables of one ``schema`` one after the other into one Parquet file (one in memory at a time; a
    row group or more each): locally via ``.tmp`` + rename; on an object store straight to its name."""
    import pyarrow.parquet as pq

    if isinstance(path, RemotePath):
        target, fs = path.path, path.fs
    else:
        target, fs = str(path.with_name(path.name + ".tmp")), None
    with pq.ParquetWriter(target, schema, filesystem=fs) as sink:
        for table in tables:
            sink.write_table(table)
    if not isinstance(path, RemotePath):
        os.replace(target, path)


def tar_samples(urls: Iterable[str | Path | RemotePath], select_files=None) -> Iterator[dict[str, Any]]:
    """webdataset samples (``__key__``, ``__url__``, member bytes) of shards given by path or URI, opened
    through their filesystem (local files, s3://, gs://, ...); shards are read one after the other."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def streams() -> Iterator[dict[str, Any]]:
        for url in urls:
            path = location(url) if not isinstance(url, (Path, RemotePath)) else url
            yield {"url": str(url), "stream": path.open("rb")}

    return group_by_keys(tar_file_expander(streams(), select_files=select_files))


def url_stage(select_files=None):
    """A webdataset pipeline stage: ``{"url": ...}`` dicts in, samples out (:func:`tar_samples`)."""
    def stage(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return tar_samples((s["url"] for s in src), select_files)

    return stage


# --- checks before a run ---------------------------------------------------------------------------
def check_reachable(out: RemotePath) -> None:
    """One listing call: the endpoint answers, the credentials are accepted and the bucket exists;
    else one OutputError line (nothing has been written)."""
    import pyarrow.fs as pafs

    bucket = out.path.split("/", 1)[0]
    try:
        info = out.fs.get_file_info(bucket)
    except OSError as e:
        raise OutputError(f"output.dir: {out}: the object store refused or did not answer ({describe(e)}); check "
                          "the endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), the credentials and the network"
                          ) from None
    if info.type == pafs.FileType.NotFound:
        raise OutputError(f"output.dir: {out}: bucket {bucket!r} does not exist (or these credentials cannot see "
                          "it); create it or fix the name")


def check_writable(out: Path) -> None:
    """A local output dir (or, before it exists, its nearest existing folder) takes a new file: one nameless
    temporary file (O_TMPFILE where the filesystem has it) is made and closed there. A read-only mount, an
    immutable or foreign-owned folder or a pseudo-filesystem fails here, before Ray starts; else one
    OutputError line. Nothing is left behind."""
    import tempfile

    folder = Path(out)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        where = "" if folder == Path(out) else f" (to be made in {folder})"
        kept = "committed shards are kept: " if folder == Path(out) else ""
        raise OutputError(f"output.dir: {failure(e)} in {out}{where}: it cannot be written; {kept}fix the directory "
                          "(permissions, the mount) or choose another output dir") from None


#: errors of the output filesystem that a plain rerun repeats until the user acts
_STORAGE_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                   errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
                   errno.EDQUOT: "disk quota exceeded"}


def failure(e: OSError) -> str:
    """What a failed write on the output filesystem ran into, in a few words."""
    what = _STORAGE_ERRNOS.get(e.errno, e.strerror or describe(e))  # object stores: no errno, a long AWS text
    return what[:1].lower() + what[1:]


def describe(e: BaseException) -> str:
    """A short one-line description of a filesystem error (AWS errors are long, multi-line)."""
    text = _first_line(e)
    m = re.search(r"AWS Error ([A-Z_]+)", text)
    if m:
        detail = re.search(r"operation: (.*)$", text)
        return f"{m.group(1).lower().replace('_', ' ')}" + (f": {detail.group(1)[:160]}" if detail and
                                                             detail.group(1).strip() else "")
    return text

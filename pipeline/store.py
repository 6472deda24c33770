"""Where a run's output lives: a local folder, or any filesystem a cluster shares.

``output:`` (and ``--output``) is a local path or a URI that pyarrow or fsspec understands:
``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``, ``file:///abs/path``.
Credentials and endpoints come from each filesystem's standard environment (for S3:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``).

A :class:`Store` is resolved once on the driver and pickled to the workers (pyarrow
filesystems pickle with their options, endpoint included), so every process writes to the
same place. Every write is atomic: on a local disk by write-to-temporary, fsync, rename;
on an object store a PUT only becomes visible once complete.

Example::

    store = Store.open("s3://bucket/runs/nightly")
    store.write_json("run.json", {"status": "complete"})
    store.read_json("run.json")
"""

from __future__ import annotations

import builtins
import io
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import UserError

# Environment variables that tell a process how to reach and sign in to an object store.
FORWARDED = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE",
    "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
})
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain path."""
    return isinstance(location, str) and SCHEME.match(location) is not None


def known_scheme(scheme: str) -> bool:
    """Whether pyarrow or fsspec has a filesystem for ``scheme`` (nothing is contacted)."""
    from fsspec.registry import known_implementations, registry

    return scheme in {"file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"} or \
        scheme in known_implementations or scheme in registry


def _fsspec(uri: str) -> tuple[pafs.FileSystem, str]:
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(uri)
    return PyFileSystem(FSSpecHandler(fs)), path


class Store:
    """A folder on some filesystem; every path below is relative to it, '/'-separated."""

    def __init__(self, fs: pafs.FileSystem, root: str, uri: str):
        self.fs, self.root, self.uri = fs, root.rstrip("/") or "/", uri
        self.local = isinstance(fs, pafs.LocalFileSystem)

    @classmethod
    def open(cls, location: str | Path) -> Store:
        """The store at a local path or URI; a URI no filesystem serves is a :class:`UserError`."""
        if not is_uri(location):
            path = os.path.abspath(Path(location).expanduser())
            return cls(pafs.LocalFileSystem(), path, path)
        uri = str(location).rstrip("/")
        scheme = SCHEME.match(uri).group(1).lower()  # type: ignore[union-attr]
        if scheme == "file":
            path = uri[len("file://"):]
            return cls(pafs.LocalFileSystem(), os.path.abspath(path), uri)
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            try:
                fs, path = _fsspec(uri)
            except (ImportError, ValueError) as e:
                raise UserError(f"output: no filesystem can serve {uri!r} ({type(e).__name__}: {e}); "
                                "use a local path or a URI such as s3://bucket/prefix") from None
        except OSError as e:
            raise UserError(f"output: cannot reach {uri}: {e}") from None
        return cls(fs, path, uri)

    def worker_env(self) -> dict[str, str]:
        """The standard environment variables of this filesystem set here (endpoint,
        credentials, region), for the workers that write to it: a worker started before
        they were set, or on a node without them, still reaches the same store."""
        if self.local:
            return {}
        return {k: v for k, v in os.environ.items() if k in FORWARDED or k.startswith("AWS_ENDPOINT_URL")}

    def remote_args(self) -> dict:
        """Ray remote arguments for the tasks and actors that write here: :meth:`worker_env`
        as their runtime environment (none for a local folder)."""
        env = self.worker_env()
        return {"runtime_env": {"env_vars": env}} if env else {}

    # ------------------------------------------------------------------ paths

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (for pyarrow calls that take a ``filesystem``)."""
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def display(self, rel: str = "") -> str:
        """``rel`` as a person would type it: a local path or the URI."""
        rel = rel.strip("/")
        return (self.path(rel) if self.local else f"{self.uri}/{rel}") if rel else (
            self.root if self.local else self.uri)

    def child(self, rel: str) -> Store:
        return Store(self.fs, self.path(rel), self.display(rel))

    # ------------------------------------------------------------------ reading

    def info(self, rel: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(rel))

    def is_file(self, rel: str) -> bool:
        return self.info(rel).type == pafs.FileType.File

    def is_dir(self, rel: str) -> bool:
        return self.info(rel).type == pafs.FileType.Directory

    def exists(self, rel: str) -> bool:
        return self.info(rel).type != pafs.FileType.NotFound

    # ``list`` below shadows the builtin in this class body, so later annotations spell ``builtins.list``.
    def list(self, rel: str = "", recursive: bool = False) -> builtins.list[pafs.FileInfo]:
        """Files and folders under ``rel`` ([] when it does not exist); ``info.path`` stays absolute."""
        selector = pafs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True)
        return sorted(self.fs.get_file_info(selector), key=lambda i: i.path)

    def files(self, rel: str = "", recursive: bool = False) -> builtins.list[str]:
        """Paths of the plain files under ``rel``, relative to this store, sorted."""
        base = len(self.root.rstrip("/")) + 1
        return sorted(i.path[base:] for i in self.list(rel, recursive) if i.type == pafs.FileType.File)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str) -> Any:
        """The parsed JSON at ``rel``; None when it is missing or not whole JSON."""
        try:
            return json.loads(self.read_text(rel))
        except (FileNotFoundError, ValueError):
            return None
        except OSError:
            if not self.exists(rel):
                return None
            raise

    def open_input(self, rel: str) -> IO[bytes]:
        """A seekable binary file (for tar and Parquet readers)."""
        return self.fs.open_input_file(self.path(rel))

    def read_table(self, rel: str, columns: builtins.list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), columns=columns, filesystem=self.fs)

    # ------------------------------------------------------------------ writing

    def mkdir(self, rel: str = "") -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def write_bytes(self, rel: str, data: bytes, durable: bool = True) -> int:
        """Write ``data`` so readers see the old file or the whole new one; return its size."""
        if self.local:
            path = Path(self.path(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if durable:
                _fsync_dir(path.parent)
        else:
            with self.fs.open_output_stream(self.path(rel)) as f:
                f.write(data)
        return len(data)

    def write_text(self, rel: str, text: str) -> int:
        return self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any, indent: int | None = 2) -> int:
        return self.write_text(rel, json.dumps(obj, indent=indent, default=str) + "\n")

    def write_table(self, rel: str, table: pa.Table) -> int:
        """A Parquet file, atomically; returns its size in bytes."""
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return self.write_bytes(rel, buf.getvalue())

    def move(self, src: str, dst: str) -> None:
        """Rename a file (on object stores: a server-side copy, then a delete)."""
        if self.local:
            Path(self.path(dst)).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path(src), self.path(dst))
        else:
            self.fs.move(self.path(src), self.path(dst))

    def copy(self, src: str, dst: str) -> None:
        """Copy a file (server-side on object stores: no bytes pass through this process)."""
        self.fs.copy_file(self.path(src), self.path(dst))

    def delete(self, rel: str) -> None:
        """Remove a file or a whole folder; nothing happens when it is not there."""
        info = self.info(rel)
        if info.type == pafs.FileType.NotFound:
            return
        if self.local:
            path = Path(self.path(rel))
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        elif info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        else:
            self.fs.delete_file(self.path(rel))

    def replace_dir(self, src: str, dst: str) -> None:
        """Move folder ``src`` to ``dst``, replacing it: one atomic rename on a local disk."""
        self.delete(dst)
        if self.local:
            Path(self.path(dst)).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path(src), self.path(dst))
            _fsync_dir(Path(self.path(dst)).parent)
        else:
            for rel in self.files(src, recursive=True):
                self.move(rel, dst + rel[len(src):])
            self.delete(src)

    def __repr__(self) -> str:
        return f"Store({self.display()!r})"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

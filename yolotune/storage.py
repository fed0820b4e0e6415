"""Where experiments are stored: a local (or shared) directory, or an object store URI that
``pyarrow.fs.FileSystem.from_uri`` resolves (``s3://bucket/prefix``, ``gs://...``).

One code path: yolotune reads and writes an experiment in a local directory, ``Location.local``.
For a directory that is the experiment itself, and ``download``/``upload`` do nothing. For a URI
it is a mirror in the local cache (``$YOLOTUNE_CACHE``, default ``~/.cache/yolotune``):
``download`` copies the experiment's small files there (never checkpoints or weights; only those
new or changed since the last download) and
``upload`` writes files back. Endpoint and credentials come from the environment (AWS_*,
profiles, instance roles, as pyarrow and Ray read them), never from yolotune's config.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import cached_property
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from yolotune.layout import first_line, storage_dir, write_atomic


def is_uri(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("YOLOTUNE_CACHE", "~/.cache/yolotune")))


def _small(relative: str) -> bool:
    """What results and resume read: everything but checkpoints and weights."""
    return not relative.endswith(".pt") and not any(p.startswith("checkpoint_") for p in relative.split("/"))


def _same(local: Path, info) -> bool:
    """Whether the local copy is the store's file as ``download`` left it (its size and mtime): a
    refresh of a large experiment moves only the files that are new or changed."""
    try:
        stat = local.stat()
    except OSError:
        return False
    return stat.st_size == info.size and info.mtime is not None and abs(stat.st_mtime - info.mtime.timestamp()) < 1e-3


class Location:
    """A storage dir or an experiment dir, given as a path or a URI."""

    def __init__(self, uri: str, fs=None, fs_path: Optional[str] = None):
        self.uri = uri if is_uri(uri) else str(storage_dir(uri))
        if fs is not None:
            self.__dict__["_fs"] = (fs, fs_path)

    @classmethod
    def on(cls, fs, fs_path: str) -> "Location":
        """The location of a path on a pyarrow filesystem (Ray's trial.storage gives those)."""
        from pyarrow.fs import LocalFileSystem

        uri = fs_path if isinstance(fs, LocalFileSystem) else f"{fs.type_name}://{fs_path}"
        return cls(uri, fs, fs_path)

    @property
    def remote(self) -> bool:
        return is_uri(self.uri)

    @cached_property
    def _fs(self):
        from pyarrow.fs import FileSystem, LocalFileSystem

        if not self.remote:
            return LocalFileSystem(), self.uri
        return FileSystem.from_uri(self.uri)

    @property
    def fs(self):
        return self._fs[0]

    @property
    def fs_path(self) -> str:
        return self._fs[1].rstrip("/")

    def child(self, name: str) -> "Location":
        if not self.remote:
            return Location(str(Path(self.uri) / name))
        parts = urlsplit(self.uri)  # the name goes before a query (?endpoint_override=...)
        return Location(parts._replace(path=parts.path.rstrip("/") + "/" + name).geturl(), self.fs,
                        f"{self.fs_path}/{name}")

    @property
    def local(self) -> Path:
        """Where yolotune reads and writes this location: itself, or its mirror in the cache."""
        if not self.remote:
            return Path(self.uri)
        return cache_root() / self.fs.type_name / self.fs_path

    def exists(self) -> bool:
        if not self.remote:
            return Path(self.uri).exists()
        from pyarrow.fs import FileType

        return self.fs.get_file_info(self.fs_path).type != FileType.NotFound

    def download(self, into: Optional[Path] = None, select=_small) -> Path:
        """Copy the files under this location that ``select`` keeps (by relative path) into
        ``into`` (default: the mirror); returns that directory."""
        into = into or self.local
        if not self.remote and into == self.local:
            return into
        from pyarrow.fs import FileSelector, FileType

        found = self.fs.get_file_info(FileSelector(self.fs_path, recursive=True, allow_not_found=True))
        for info in found:
            relative = info.path[len(self.fs_path) + 1:]
            if info.type == FileType.File and select(relative) and not _same(into / relative, info):
                with self.fs.open_input_stream(info.path) as f:
                    write_atomic(into / relative, f.read())
                os.utime(into / relative, (info.mtime.timestamp(),) * 2)  # "newest experiment" compares these
        return into

    def fetch(self, relative: str) -> Optional[Path]:
        """One file (say a weights file, which ``download`` leaves) into the mirror; None if absent."""
        self.download(select=lambda r: r == relative)
        path = self.local / relative
        return path if path.is_file() else None

    def upload(self, *paths: Path) -> None:
        """Write these files of the mirror back to the store."""
        if not self.remote:
            return
        for path in paths:
            relative = Path(path).relative_to(self.local).as_posix()
            with self.fs.open_output_stream(f"{self.fs_path}/{relative}") as f:
                f.write(Path(path).read_bytes())

    def node_copy(self) -> Path:
        """This node's copy of the file or folder here (a dataset, weights), fetched on first use
        and again only when the store's copy changed. Trials on one node share it: a lock lets one
        of them download while the others wait."""
        from filelock import FileLock
        from pyarrow.fs import FileSelector, FileType

        if not self.remote:
            return Path(self.uri)
        local = cache_root() / "fetched" / self.fs.type_name / self.fs_path
        local.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{local}.lock"):
            info = self.fs.get_file_info(self.fs_path)
            if info.type == FileType.File:
                files = [info]
            elif info.type == FileType.Directory:
                files = [i for i in self.fs.get_file_info(FileSelector(self.fs_path, recursive=True))
                         if i.type == FileType.File]
            else:
                raise FileNotFoundError(f"{self.uri}: not found")
            manifest = json.dumps(sorted((i.path, i.size, i.mtime_ns) for i in files))
            marker = Path(f"{local}.fetched")  # what the copy was made from
            if marker.is_file() and marker.read_text() == manifest and local.exists():
                return local
            marker.unlink(missing_ok=True)
            shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink(missing_ok=True)
            for i in files:
                with self.fs.open_input_stream(i.path) as f:
                    write_atomic(local / i.path[len(self.fs_path) + 1:] if info.type == FileType.Directory
                                 else local, f.read())
            marker.write_text(manifest)
        return local

    def delete(self, relative: str) -> None:
        """Remove one file here, and from the mirror."""
        (self.local / relative).unlink(missing_ok=True)
        if self.remote:
            try:
                self.fs.delete_file(f"{self.fs_path}/{relative}")
            except FileNotFoundError:
                pass

    def check_reachable(self, timeout_s: float = 20.0) -> Optional[str]:
        """Why this store cannot be used (one line), or None. Bounded: the SDK's own retries over a
        dead endpoint take minutes."""
        def probe():
            from pyarrow.fs import FileType

            bucket = self.fs_path.split("/")[0]
            if self.fs.get_file_info(bucket).type != FileType.Directory:
                return f"no bucket {bucket!r} there"
            self.fs.get_file_info(self.fs_path)
            return None

        pool = ThreadPoolExecutor(1)
        try:
            return pool.submit(probe).result(timeout=timeout_s)
        except FutureTimeout:
            return f"no answer within {timeout_s:g} s"
        except Exception as e:  # noqa: BLE001 - whatever the SDK says: endpoint, credentials, permissions
            return first_line(str(e))
        finally:
            pool.shutdown(wait=False)


def node_dataset(yaml_uri: str) -> Path:
    """This node's copy of the dataset whose data YAML is at ``yaml_uri`` (the YAML's folder, see
    ``Location.node_copy``); returns a data YAML beside it whose ``path`` is that folder. (Ultralytics
    resolves a relative ``path`` against its own datasets dir, not the YAML's.)"""
    import yaml

    from pyarrow.fs import FileType

    data_yaml = Location(yaml_uri)
    if data_yaml.fs.get_file_info(data_yaml.fs_path).type != FileType.File:
        raise FileNotFoundError(f"{yaml_uri}: not found")
    parts = urlsplit(yaml_uri)
    folder_path, name = parts.path.rstrip("/").rsplit("/", 1)
    folder = Location(parts._replace(path=folder_path).geturl()).node_copy()
    content = yaml.safe_load((folder / name).read_text())
    if isinstance(content, dict):
        if Path(str(content.get("path") or "")).is_absolute():
            raise ValueError(f"its path: {content['path']} is absolute; in a store, paths in a data YAML are "
                             "relative to its folder")
        content["path"] = str((folder / str(content.get("path") or "")).resolve())
    local = Path(f"{folder}.{name}")
    write_atomic(local, yaml.safe_dump(content, sort_keys=False))
    return local


def node_file(path_or_uri: str) -> str:
    """A local path for a file given as a path or a URI (weights): URIs are fetched once per node."""
    return str(Location(path_or_uri).node_copy()) if is_uri(path_or_uri) else path_or_uri


def fetch_checked(key: str, uri: str, fetch, what: str) -> Path:
    """``fetch(uri)`` in the driver, before Ray starts: a store it cannot reach or a file it cannot
    fetch is one ConfigError naming ``key``."""
    from yolotune.errors import ConfigError

    unreachable = Location(uri).check_reachable()
    if unreachable:
        raise ConfigError(key, uri, f"cannot reach the store: {unreachable}")
    try:
        return Path(fetch(uri))
    except Exception as e:  # noqa: BLE001 - whatever the store (or the data YAML in it) says
        raise ConfigError(key, uri, f"cannot fetch {what}: {first_line(str(e))}") from None


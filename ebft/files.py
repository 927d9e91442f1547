"""Files that are never half written, and directories one process writes at a time (layer 0).

Every file the project writes for later (results, reports, checkpoints, saved models, caches) goes
through :func:`atomic_path`: written to ``<name>.tmp`` beside its destination and renamed over it, so
a reader (or a crash) never sees half a file. A run or evaluation holds its directory with
:func:`directory_lock`; a full disk is reported as :class:`DiskFull`, naming the path and the space.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (``<name>.<pid>.tmp``: processes writing the same file at once do
    not collide) for the block to write, a file or a folder; renamed over ``path`` when the block ends (a
    folder replaces the old one), removed when it raises. Parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and path.is_dir():
        old = path.with_name(f"{path.name}.{os.getpid()}.old.tmp")
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(data, path: str | os.PathLike, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (UTF-8, not escaped) atomically."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False))


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    """Write a CSV file (a header line, then ``rows``; None is an empty cell) atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return write_text(path, buffer.getvalue())


LOCK_FILE = ".lock"
"""Held (``flock``) by the process writing into a run or evaluation directory."""


class DirectoryBusy(RuntimeError):
    """Another process is writing into the directory."""


class DiskFull(RuntimeError):
    """No space left while writing a file: one line naming the path and the space it needed."""

    def __init__(self, path: str | os.PathLike, needed_bytes: int | None = None):
        path = Path(path)
        free = shutil.disk_usage(next((p for p in (path, *path.parents) if p.exists()), Path("."))).free
        need = f" (it needs about {needed_bytes / 2**20:,.0f} MiB)" if needed_bytes else ""
        super().__init__(f"no space left on the device writing {path}{need}; {free / 2**20:,.0f} MiB free there: "
                         "free space or write to another disk, then run again (a run resumes from its last checkpoint)")


@contextmanager
def disk_full_names(path: str | os.PathLike, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn ``ENOSPC`` raised inside the block into :class:`DiskFull` naming ``path``."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise DiskFull(path, needed_bytes) from None


@contextmanager
def directory_lock(directory: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (made if missing) while the block runs, so two processes
    never write into one directory at once. The lock is the kernel's (``flock`` on ``.lock``): it goes
    with the process, however that ends. Raises :class:`DirectoryBusy` when another process holds it. A
    directory the block made and left empty is removed afterwards."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise DirectoryBusy(f"{directory} is in use by {holder}: wait until it finishes, or give this {what} "
                                "another directory (hydra.run.dir=..., or leave it at its default)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what} pid {os.getpid()}\n")
        handle.flush()
        try:
            yield directory
        finally:
            handle.seek(0)
            handle.truncate()
            if created and [p.name for p in directory.iterdir()] == [LOCK_FILE]:
                shutil.rmtree(directory)
            fcntl.flock(handle, fcntl.LOCK_UN)

"""Files on disk, written safely: atomic writes, a folder's writability checked before the work,
JSON without non-finite floats, and a file's sha256.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file (JSON, Markdown, CSV) atomically (`write_atomic`)."""
    return write_atomic(Path(path), lambda f: f.write(text.encode("utf-8")))


def write_atomic(path: Path, write) -> Path:
    """`write(f)` into a temporary file beside `path`, then rename it over `path`: atomic on one
    filesystem, so readers see the old file or the new one, and an interruption leaves no partial
    file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp makes the file 0600, and the mode survives the rename: give it what a plain open would
    mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            # a full disk names no file of its own: say which one, and what to do
            raise OSError(
                e.errno,
                f"cannot write {path}: {e.strerror}; free space on its disk or write elsewhere",
            ) from None
        raise
    return path


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


MIN_FREE_BYTES = 64 * 2**20  # what a run's outputs need at least: a few PNGs and JSON files


def check_writable(
    folder: str | Path, what: str = "output folder", min_free: int = MIN_FREE_BYTES
) -> None:
    """Raise PermissionError/NotADirectoryError now if files cannot be created in `folder` (or, when
    it does not exist yet, in the nearest folder above it that does), and OSError (ENOSPC) if its
    disk has less than `min_free` bytes free, instead of after the compute."""
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"cannot write into {folder}: {probe} is a file, not a folder")
    try:
        # an unnamed file (O_TMPFILE) where the OS has them, so a process killed here leaves no
        # name behind; elsewhere a named one, unlinked at once, whose ".tmp" a resumed
        # `calibrate` sweeps up with the atomic writes' leftovers
        with tempfile.TemporaryFile(prefix=".minid-write-check.", suffix=".tmp", dir=probe):
            pass
    except OSError as e:
        raise PermissionError(
            f"cannot write into the {what} {folder} ({e.strerror or e}); choose a folder you "
            "can write to"
        ) from None
    free = shutil.disk_usage(probe).free
    if free < min_free:
        raise OSError(
            errno.ENOSPC,
            f"the {what} {folder} is on a disk with {free / 2**20:.1f} MiB free, less than the "
            f"{min_free / 2**20:.0f} MiB the outputs may need; free space there or write elsewhere",
        )


def json_safe(record: dict) -> dict:
    """A record's non-finite floats for JSON, which has neither: ±inf (the PSNR of an exact
    reconstruction) as the strings "inf" / "-inf", as the CSV files write them; NaN (no value) as
    null."""

    def safe(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else str(v)
        return v

    return {k: safe(v) for k, v in record.items()}


def sha256_file(path: str | Path, block: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "output folder"):
    """Hold an exclusive lock on `folder` (an flock on `folder/.minid.lock`, which says whose it
    is): a second run on the same folder fails at once with one line instead of doing the work
    twice. The kernel drops the lock when the process ends, however it ends, so a killed run leaves
    no stale lock. Where flock is missing (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(folder) / ".minid.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise BlockingIOError(
                errno.EWOULDBLOCK,
                f"{what} {folder} is in use by {holder}; wait for it to finish, or give another "
                f"{what}",
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"minid (pid {os.getpid()})\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def available_memory() -> int | None:
    """Bytes of memory this machine can give a new allocation without swapping (Linux's
    MemAvailable, or psutil's `available`); None where neither is there to ask."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def check_memory(need: int, what: str, flag: str, available: int | None = None) -> None:
    """Raise MemoryError with one line when `need` bytes exceed what the machine has available
    (`available_memory()`; unknown: no check). `what` says what needs it, `flag` how to go on."""
    have = available_memory() if available is None else available
    if have is None or need <= have:
        return
    raise MemoryError(
        f"{what} needs about {need / 2**30:.1f} GiB of memory and this machine has "
        f"{have / 2**30:.1f} GiB available; shrink the images, free memory, or pass {flag} to try "
        "anyway"
    )

"""File primitives every stage shares: atomic writes, checksums, JSON reading with one-line errors, UTC time.

Torch-free. A reader of a file written here sees the old content or the new, never half of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from telepathy.errors import UserError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600: collaborators on a shared cluster must read results
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON file's content; None when it does not exist; a one-line UserError when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        line = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise UserError(f"{what} {path} is not valid JSON{line}; restore or remove it") from None


# ---- a full disk (or quota): checked before a big write, recognised when a write fails anyway (the check races)

_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))  # as wrapped by safetensors' Rust errors


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: str | Path) -> int:
    """Free space (for this user) on the filesystem that holds `path`, or would hold it once created."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def no_space(path: str | Path, what: str, need: int, fix: str) -> UserError:
    return UserError(
        f"no space left on {path}: {what} needs {format_bytes(need)}, {format_bytes(free_bytes(path))} free; {fix}"
    )


def check_space(path: str | Path, what: str, need: int, fix: str) -> None:
    """A one-line UserError before writing `need` bytes under `path` if they cannot fit."""
    if free_bytes(path) < need:
        raise no_space(path, what, need, fix)


def disk_full(error: BaseException, path: str | Path, need: int) -> bool:
    """Whether a failed write of `need` bytes under `path` failed for lack of space. Only plain file writes say
    ENOSPC: torch.save reports "unexpected pos" and safetensors its own error type, so a failure while less
    than `need` is free counts too (the write could not have fit)."""
    e: BaseException | None = error
    while e is not None:
        if (isinstance(e, OSError) and e.errno in _FULL) or any(s in str(e) for s in _FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    try:
        return free_bytes(path) < need
    except OSError:
        return False


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

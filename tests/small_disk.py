"""A small real filesystem for the disk-full tests: a tmpfs of a given size (needs root; we run as root here and
in CI). Without root the test is skipped with the reason; as root a failed mount is a failure, never a skip."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted(path: Path, size: str):
    """`path` (created) as a tmpfs of `size` (mount's syntax: 64k, 3m) until the block ends."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        why = done.stderr.decode().strip() or f"mount exited {done.returncode}"
        if os.geteuid() != 0:
            pytest.skip(f"the disk-full tests mount a tmpfs, which needs root: {why}")
        raise AssertionError(f"cannot mount a {size} tmpfs at {path} although root: {why}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)

"""The memory table (configs/memory_table.yaml): per-pair micro-batch and accumulation, with provenance."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from telepathy.errors import UserError
from telepathy.files import atomic_write_text
from telepathy.paths import configs_dir, read_yaml, user_config_dir
from telepathy.registry import Pair

TABLE = "memory_table.yaml"


@dataclass(frozen=True)
class TableRow:
    sender: str
    receiver: str | None  # None: a single-model row ("Single Llama-8B")
    micro_batch: int
    grad_accum: int
    effective_batch: int
    gpu_memory_gb: float
    seq_len: int
    dtype: str
    backend: str
    provenance: str  # "seed table", or "measured on <GPU> <date>"
    measured: dict[str, Any] | None = None  # GPU name, date, versions, peak GiB (measured rows)

    def matches(self, pair: Pair, *, seq_len: int, backend: str, gpu_memory_gb: float) -> bool:
        receiver = None if pair.single else pair.receiver.arch_key
        return (
            self.sender == pair.sender.arch_key
            and self.receiver == receiver
            and self.backend == backend
            and float(self.gpu_memory_gb) == float(gpu_memory_gb)
            and self.seq_len >= seq_len
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "receiver"}


def user_table_path() -> Path:
    """Where measured rows go: the user's configuration folder (never the installed package)."""
    return user_config_dir() / TABLE


def _rows(path: Path) -> list[TableRow]:
    raw = read_yaml(path, "memory table", "restore the file or remove it")
    if not isinstance(raw, dict) or not isinstance(raw.get("rows"), list):
        raise UserError(f"memory table {path} needs a top-level 'rows' list; see the shipped one's header comment")
    rows = []
    for i, r in enumerate(raw["rows"], 1):
        try:
            row = TableRow(**r)
            bad = [k for k in ("micro_batch", "grad_accum", "effective_batch", "seq_len") if int(getattr(row, k)) < 1]
        except (TypeError, ValueError) as e:
            raise UserError(f"memory table {path}, row {i}: {e}; fix the row") from None
        if bad:
            raise UserError(f"memory table {path}, row {i}: {', '.join(bad)} must be >= 1; fix the row")
        if row.micro_batch * row.grad_accum != row.effective_batch:
            raise UserError(
                f"memory table {path}, row {i}: micro_batch x grad_accum = {row.micro_batch * row.grad_accum} "
                f"but effective_batch = {row.effective_batch}; fix the row"
            )
        rows.append(row)
    return rows


def load_table(path: Path | None = None) -> list[TableRow]:
    """The shipped rows and the user's (measured rows win in find_row); or one file's rows."""
    if path is not None:
        return _rows(path)
    shipped = configs_dir() / TABLE  # must exist (a broken install); the user's layer is optional
    return _rows(shipped) + (load_user_rows() if user_table_path() != shipped else [])


def load_user_rows() -> list[TableRow]:
    path = user_table_path()
    return _rows(path) if path.is_file() else []


def find_row(rows: list[TableRow], pair: Pair, *, seq_len: int, backend: str, gpu_memory_gb: float) -> TableRow | None:
    """The matching row with the smallest sequence length (the tightest that still covers the request);
    measured rows win over seed rows."""
    hits = [r for r in rows if r.matches(pair, seq_len=seq_len, backend=backend, gpu_memory_gb=gpu_memory_gb)]
    hits.sort(key=lambda r: (r.measured is None, r.seq_len))
    return hits[0] if hits else None


def save_user_rows(rows: list[TableRow]) -> Path:
    """Rewrite the user's table atomically (its header comment kept); returns its path."""
    path = user_table_path()
    header = (
        "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
        if path.exists()
        else "# Measured rows (launch memory --measure), layered over the shipped memory table.\n"
    )
    body = yaml.safe_dump({"rows": [r.to_dict() for r in rows]}, sort_keys=False, width=200)
    atomic_write_text(path, header + body)
    return path

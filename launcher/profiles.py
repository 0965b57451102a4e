"""Cluster profiles (configs/clusters/*.yaml) with environment and flag overrides.

Precedence, lowest first: the profile file, `TELEPATHY_<FIELD>` environment variables, CLI flags.
Every field can be overridden both ways; the flags are generated from the dataclass fields.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telepathy.errors import UserError
from telepathy.paths import config_file, config_names, read_yaml

DEFAULT_PROFILE = "dgx-h100"


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    gpus_per_node: int
    gpu_memory_gb: float
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit_min: int = 720
    cpus_per_gpu: int = 8
    mem_per_gpu_gb: float = 64
    max_array_size: int = 1001
    array_parallelism: int = 64
    signal_delay_s: int = 120
    max_requeues: int = 5
    hf_home: str | None = None
    # Compute nodes cannot reach the Hub: jobs read only the cache (HF_HUB_OFFLINE=1), and the launcher checks
    # before submitting that everything a run reads is in it (fill it with `launch prefetch` on a login node).
    offline: bool = True
    device: str = "cuda"  # "cpu" for the local test cluster (gloo)
    setup: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for k in (
            "gpus_per_node",
            "gpu_memory_gb",
            "time_limit_min",
            "cpus_per_gpu",
            "max_array_size",
            "array_parallelism",
        ):
            if getattr(self, k) <= 0:
                raise UserError(f"cluster profile '{self.name}': {k} must be positive (got {getattr(self, k)})")
        if self.device not in ("cuda", "cpu"):
            raise UserError(f"cluster profile '{self.name}': device must be cuda or cpu (got {self.device})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["setup"] = list(self.setup)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterProfile:
        return cls(**{**d, "setup": tuple(d.get("setup") or ()), "env": dict(d.get("env") or {})})


def boolean(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# Fields a flag or environment variable may set, with their parsers.
def _parser(f: dataclasses.Field):
    t = str(f.type)
    if t.startswith("bool"):
        return boolean
    if t.startswith("int"):
        return int
    if t.startswith("float"):
        return float
    return str


OVERRIDABLE = {f.name: _parser(f) for f in dataclasses.fields(ClusterProfile) if f.name not in ("name", "setup", "env")}


def env_var(name: str) -> str:
    return f"TELEPATHY_{name.upper()}"


def add_profile_flags(parser) -> None:
    """One `--<field>` flag per overridable profile field (e.g. --account, --time-limit-min)."""
    group = parser.add_argument_group("cluster profile overrides (also TELEPATHY_<FIELD> env vars)")
    group.add_argument(
        "--cluster",
        default=None,
        help=f"profile in configs/clusters/ (default {DEFAULT_PROFILE}; env TELEPATHY_CLUSTER)",
    )
    for name in OVERRIDABLE:
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"profile_{name}", default=None, metavar="V")


def profile_names() -> list[str]:
    return config_names("clusters")


def load_profile(
    name: str | None = None, overrides: dict[str, str | None] | None = None, environ: dict[str, str] | None = None
) -> ClusterProfile:
    environ = os.environ if environ is None else environ
    name = name or environ.get("TELEPATHY_CLUSTER") or DEFAULT_PROFILE
    path = Path(name) if name.endswith((".yaml", ".yml")) else config_file(f"clusters/{name}.yaml")
    if not path.is_file():
        raise UserError(f"cluster profile '{name}' not found ({path}); available: {', '.join(profile_names())}")
    raw = read_yaml(path, "cluster profile", "check the path")
    if not isinstance(raw, dict):
        raise UserError(f"cluster profile {path} must be a mapping of fields; see configs/clusters/dgx-h100.yaml")
    known = {f.name for f in dataclasses.fields(ClusterProfile)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(
            f"cluster profile {path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    values: dict[str, Any] = dict(raw)
    values.setdefault("name", path.stem)
    sources = [(environ.get(env_var(k)), env_var(k)) for k in OVERRIDABLE]
    sources += [((overrides or {}).get(k), f"--{k.replace('_', '-')}") for k in OVERRIDABLE]
    for (value, where), key in zip(sources, list(OVERRIDABLE) * 2):
        if value is None:
            continue
        try:
            values[key] = OVERRIDABLE[key](value)
        except ValueError:
            raise UserError(f"{where}={value!r} is not a valid {OVERRIDABLE[key].__name__}; fix the value") from None
    try:
        return ClusterProfile.from_dict(values)
    except TypeError as e:
        raise UserError(f"cluster profile {path}: {e}; see configs/clusters/dgx-h100.yaml") from None

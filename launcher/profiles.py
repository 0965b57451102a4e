"""Cluster profiles (configs/clusters/*.yaml) with environment and flag overrides.

Precedence, lowest first: the profile file, `TELEPATHY_<FIELD>` environment variables, CLI flags.
Every field can be overridden both ways; the flags are generated from the dataclass fields.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telepathy.errors import UserError
from telepathy.paths import config_file, config_names, read_yaml
from telepathy.secrets import is_secret_name, literal_secret_assignments

DEFAULT_PROFILE = "dgx-h100"


# For torchrun itself: with --max-restarts, torch >= 2.4's agent hands its own TCP store to every attempt's
# workers, and the keys an earlier attempt's process group left there (gloo addresses, NCCL ids) are read by
# the next one: its workers connect to dead peers and time out instead of restarting (seen with gloo). This
# opt-out gives every attempt a fresh store hosted by its rank 0, as before torch 2.4.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    gpus_per_node: int
    gpu_memory_gb: float
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit_min: int = 720
    # The nodes' size as SLURM counts it (`sinfo -o "%c %m"`). A job of fewer GPUs than a node asks that share
    # of its cores and memory; a whole-node job asks --exclusive and all of the node's memory (--mem=0).
    # Checked against sinfo at planning when SLURM answers.
    cpus_per_node: int = 64
    mem_per_node_gb: float = 480
    # Explicit per-GPU shares instead of the node's (null: derived from the node's size).
    cpus_per_gpu: int | None = None
    mem_per_gpu_gb: float | None = None
    gpu_type: str | None = None  # typed GRES (gres.conf Type=), e.g. h100: --gpus-per-node=h100:N
    constraint: str | None = None  # --constraint (node features)
    exclusive: bool | None = None  # --exclusive; null: for whole-node jobs only
    reservation: str | None = None
    exclude: str | None = None  # nodes never to use, e.g. "gpu[07-08]"
    sbatch_args: tuple[str, ...] = ()  # further sbatch options in their long form, e.g. ["--comment=x"]
    srun_args: tuple[str, ...] = ()  # further srun options, e.g. ["--mpi=none"]
    # A container for the job step: pyxis (srun --container-image) or apptainer (apptainer exec around python).
    # It must hold telepathy's dependencies; the code snapshot, the runs and the HF cache are mounted into it.
    container_image: str | None = None
    container_runtime: str = "pyxis"
    container_mounts: tuple[str, ...] = ()  # host paths (or host:container) besides those, e.g. ["/scratch"]
    # The most nodes one job may ask (the cluster's or the partition's size; null: unknown). A larger plan is an
    # error at planning; where SLURM answers, submission and --dry-run also check against sinfo.
    max_nodes: int | None = None
    max_array_size: int = 1001
    array_parallelism: int = 64
    signal_delay_s: int = 120
    max_requeues: int = 5
    # torchrun's --max-restarts: a worker that dies (not a preemption) restarts the node's group this many
    # times, resuming from the newest checkpoint; past it the job fails and `launch resubmit` continues.
    max_restarts: int = 0
    hf_home: str | None = None
    # Compute nodes cannot reach the Hub: jobs read only the cache (HF_HUB_OFFLINE=1), and the launcher checks
    # before submitting that everything a run reads is in it (fill it with `launch prefetch` on a login node).
    offline: bool = True
    device: str = "cuda"  # "cpu" for the local test cluster (gloo)
    setup: tuple[str, ...] = ()  # shell lines run first in the job (module load, conda activate)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for k in (
            "gpus_per_node",
            "gpu_memory_gb",
            "time_limit_min",
            "cpus_per_node",
            "mem_per_node_gb",
            "max_array_size",
            "array_parallelism",
        ):
            if getattr(self, k) <= 0:
                raise UserError(f"cluster profile '{self.name}': {k} must be positive (got {getattr(self, k)})")
        for k in ("max_requeues", "max_restarts", "signal_delay_s"):
            if getattr(self, k) < 0:
                raise UserError(f"cluster profile '{self.name}': {k} must be 0 or more (got {getattr(self, k)})")
        for k in ("cpus_per_gpu", "mem_per_gpu_gb", "max_nodes"):
            if getattr(self, k) is not None and getattr(self, k) <= 0:
                raise UserError(f"cluster profile '{self.name}': {k} must be positive or null (got {getattr(self, k)})")
        if self.cpus_per_node < self.gpus_per_node and self.cpus_per_gpu is None:
            raise UserError(
                f"cluster profile '{self.name}': cpus_per_node ({self.cpus_per_node}) is below gpus_per_node "
                f"({self.gpus_per_node}); set the node's real core count"
            )
        if self.device not in ("cuda", "cpu"):
            raise UserError(f"cluster profile '{self.name}': device must be cuda or cpu (got {self.device})")
        if self.container_runtime not in CONTAINER_RUNTIMES:
            raise UserError(
                f"cluster profile '{self.name}': container_runtime must be one of {', '.join(CONTAINER_RUNTIMES)} "
                f"(got {self.container_runtime})"
            )
        if self.gpu_type is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", str(self.gpu_type)):
            raise UserError(
                f"cluster profile '{self.name}': gpu_type {self.gpu_type!r} is not a GRES type name (e.g. h100); "
                "the launcher adds the count itself"
            )
        self._check_no_secrets()
        for arg in self.sbatch_args:
            key = sbatch_option(arg)[0]
            if key in RESERVED_SBATCH:
                raise UserError(
                    f"cluster profile '{self.name}': sbatch_args may not set --{key} (the launcher sets it"
                    f"{'; use ' + RESERVED_SBATCH[key] if RESERVED_SBATCH[key] else ''})"
                )

    def _check_no_secrets(self) -> None:
        """Everything a profile holds goes into plans and job scripts: a secret may not be one of its values
        (the one predicate, telepathy/secrets.py). It reaches the job from the submitting shell instead."""
        fix = "remove it and export it in your shell (sbatch passes it to the job)"
        for key in self.env:
            if is_secret_name(str(key)):
                raise UserError(
                    f"cluster profile '{self.name}': env {key} looks like a secret and would be written into "
                    f"the job script; {fix}"
                )
        for where in ("setup", "sbatch_args", "srun_args"):
            for line in getattr(self, where):
                for name in literal_secret_assignments(str(line)):
                    raise UserError(
                        f"cluster profile '{self.name}': {where} sets {name}, which looks like a secret, to a value "
                        f"that would be written into the job script; {fix}, or read it there ({name}=$(cat FILE))"
                    )

    # ------------------------------------------------------------ what a job of `gpus` GPUs per node asks
    def whole_node(self, gpus: int) -> bool:
        return gpus >= self.gpus_per_node

    def cpus_for(self, gpus: int) -> int:
        """CPUs per node (the one task's --cpus-per-task)."""
        if self.cpus_per_gpu is not None:
            return self.cpus_per_gpu * gpus
        if self.whole_node(gpus):
            return self.cpus_per_node
        return max(1, self.cpus_per_node // self.gpus_per_node) * gpus

    def mem_gb_for(self, gpus: int) -> float | None:
        """Memory per node in GB; None: all of the node's (--mem=0)."""
        if self.mem_per_gpu_gb is not None:
            return self.mem_per_gpu_gb * gpus
        if self.whole_node(gpus):
            return None
        return math.floor(self.mem_per_node_gb * gpus / self.gpus_per_node)

    def exclusive_for(self, gpus: int) -> bool:
        return self.whole_node(gpus) if self.exclusive is None else self.exclusive

    def gpus_request(self, gpus: int) -> str | int:
        return f"{self.gpu_type}:{gpus}" if self.gpu_type else gpus

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {**d, **{k: list(getattr(self, k)) for k in LIST_FIELDS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterProfile:
        lists = {k: tuple(str(v) for v in (d.get(k) or ())) for k in LIST_FIELDS}
        return cls(**{**d, **lists, "env": dict(d.get("env") or {})})


CONTAINER_RUNTIMES = ("pyxis", "apptainer")
LIST_FIELDS = ("setup", "sbatch_args", "srun_args", "container_mounts")
# sbatch options the launcher itself sets, and the profile field to use instead (if any)
RESERVED_SBATCH = {
    "nodes": "",
    "ntasks-per-node": "",
    "gpus-per-node": "gpu_type",
    "cpus-per-task": "cpus_per_node or cpus_per_gpu",
    "mem": "mem_per_node_gb or mem_per_gpu_gb",
    "time": "time_limit_min",
    "signal": "signal_delay_s",
    "array": "array_parallelism",
    "output": "",
    "error": "",
    "open-mode": "",
    "job-name": "",
    "requeue": "",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "exclusive": "exclusive",
    "reservation": "reservation",
    "exclude": "exclude",
}


def sbatch_option(arg: str) -> tuple[str, str | bool]:
    """("key", value) of one long-form sbatch option: "--comment=x" -> ("comment", "x"), "--hold" -> ("hold", True)."""
    m = re.fullmatch(r"--([a-z][a-z0-9-]*)(?:=(.*))?", str(arg), flags=re.S)
    if not m:
        raise UserError(f"sbatch option {arg!r} is not of the form --name or --name=value; use the long form")
    return m.group(1), True if m.group(2) is None else m.group(2)


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
    if t.startswith("tuple"):
        return shlex.split  # --srun-args "--mpi=none --overlap"
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


def add_profile_flags(parser, *, cluster: bool = True) -> None:
    """One `--<field>` flag per overridable profile field (e.g. --account, --time-limit-min)."""
    group = parser.add_argument_group("cluster profile overrides (also TELEPATHY_<FIELD> env vars)")
    if cluster:
        group.add_argument(
            "--cluster",
            default=None,
            help=f"profile in configs/clusters/ (default {DEFAULT_PROFILE}; env TELEPATHY_CLUSTER)",
        )
    for name in OVERRIDABLE:
        group.add_argument(flag(name), dest=f"profile_{name}", default=None, metavar="V")


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
    _check_types(raw, path)
    values: dict[str, Any] = dict(raw)
    values.setdefault("name", path.stem)
    _override(values, {k: environ.get(env_var(k)) for k in OVERRIDABLE}, env_var)
    _override(values, overrides or {}, flag)
    try:
        return ClusterProfile.from_dict(values)
    except TypeError as e:
        raise UserError(f"cluster profile {path}: {e}; see configs/clusters/dgx-h100.yaml") from None


def _check_types(raw: dict[str, Any], path: Path) -> None:
    """A YAML value of the wrong kind (`gpus_per_node: eight`) named with its field, not a TypeError later."""
    for key, value in raw.items():
        parse = OVERRIDABLE.get(key)
        if value is None or parse not in (int, float, boolean):
            continue
        ok = isinstance(value, bool) if parse is boolean else isinstance(value, (int, float) if parse is float else int)
        if not ok or (parse is not boolean and isinstance(value, bool)):
            raise UserError(f"cluster profile {path}: {key}: {value!r} is not a {_kind(key)}; fix the file")


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _override(values: dict[str, Any], given: dict[str, str | None], where) -> None:
    for key, value in given.items():
        if value is None:
            continue
        if key not in OVERRIDABLE:
            raise UserError(f"{where(key)}: not a cluster profile field; known: {', '.join(OVERRIDABLE)}")
        try:
            values[key] = OVERRIDABLE[key](value)
        except ValueError:
            raise UserError(f"{where(key)}={value!r} is not a valid {_kind(key)}; fix the value") from None


def _kind(key: str) -> str:
    return {int: "whole number", float: "number", boolean: "true/false", shlex.split: "argument list"}.get(
        OVERRIDABLE[key], "value"
    )


def profile_overrides(args) -> dict[str, str]:
    """The profile flags given on a command line (those add_profile_flags added), by field."""
    return {k: v for k in OVERRIDABLE if (v := getattr(args, f"profile_{k}", None)) is not None}


def apply_overrides(profile: ClusterProfile, overrides: dict[str, str | None]) -> ClusterProfile:
    """The profile with flag values (as `launch` takes them) applied: what `launch resubmit --partition X` uses."""
    values = profile.to_dict()
    _override(values, overrides, flag)
    return ClusterProfile.from_dict(values)

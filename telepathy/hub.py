"""What a run reads from the Hugging Face Hub, whether it is in a cache, and fetching it (huggingface_hub only).

A model needs its config, tokenizer files and safetensors weights (never the duplicate .bin, original/ or
consolidated files); a hub task needs its split files (parquet) at the spec's revision. Compute nodes are
often offline: `launch prefetch` downloads exactly these into the cluster's HF_HOME from a login node, the
launcher's preflight checks them before anything is submitted, and offline jobs read them with
HF_HUB_OFFLINE=1. Torch-free; huggingface_hub is imported when a check or download runs.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from telepathy.errors import UserError

# Files a model load reads; weights are safetensors only.
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tekken.json",
    "added_tokens.json",
    "chat_template*",
    "*.safetensors",
    "model.safetensors.index.json",
]
MODEL_IGNORE = ["original/*", "consolidated*", "*.bin", "*.pth", "*.pt", "*.gguf", "*.msgpack", "*.h5", "*.onnx"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tekken.json")


@dataclass(frozen=True)
class Need:
    """One hub repository a run reads, at one revision, restricted to some files."""

    repo_id: str
    repo_type: str  # "model" or "dataset"
    revision: str
    allow: tuple[str, ...]
    ignore: tuple[str, ...] = ()
    name: str = ""  # the registry alias or task name it serves
    splits: dict[str, str] = field(default_factory=dict)  # datasets: split -> file pattern

    @property
    def label(self) -> str:
        return f"{self.repo_type} {self.repo_id}@{self.revision}"

    @property
    def what(self) -> str:
        return f"{'model' if self.repo_type == 'model' else 'task'} {self.name}"


def model_need(spec) -> Need | None:
    """A registry model's files, or None when nothing is downloaded (random weights, a local folder)."""
    if spec.weights == "random" or spec.path or not spec.hub_id:
        return None
    return Need(spec.hub_id, "model", spec.revision, tuple(MODEL_FILES), tuple(MODEL_IGNORE), spec.alias)


def task_need(spec) -> Need | None:
    """A hub task's split files, or None for local files."""
    if not spec.dataset:
        return None
    return Need(
        spec.dataset, "dataset", spec.revision, tuple(spec.hub_files.values()), (), spec.name, dict(spec.hub_files)
    )


def hub_cache(hf_home: str | None = None) -> Path:
    """The hub cache a job with this HF_HOME reads (else this environment's: HF_HUB_CACHE, HF_HOME)."""
    if hf_home:
        return Path(hf_home).expanduser() / "hub"
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser() / "hub"


def hub_env(profile) -> dict[str, str]:
    """What a run of this profile exports: its HF_HOME, and no Hub access at all when the nodes are offline."""
    env = {"HF_HOME": str(Path(profile.hf_home).expanduser())} if profile.hf_home else {}
    if profile.offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------- the cache


def snapshot(need: Need, cache: Path) -> Path | None:
    """The cached snapshot folder of `need`'s revision, or None (no network)."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415  (only when a cache is consulted)
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415

    try:
        return Path(
            snapshot_download(
                need.repo_id,
                repo_type=need.repo_type,
                revision=need.revision,
                allow_patterns=list(need.allow),
                ignore_patterns=list(need.ignore) or None,
                cache_dir=str(cache),
                local_files_only=True,
            )
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def missing(need: Need, cache: Path) -> list[str]:
    """What of `need` is not in the cache: [] when a job can read everything it needs."""
    root = snapshot(need, cache)
    if root is None:
        return ["everything (not in the cache)"]
    if need.repo_type == "dataset":
        return [f"{split}: {pattern}" for split, pattern in need.splits.items() if not list(root.glob(pattern))]
    gaps = [] if (root / "config.json").is_file() else ["config.json"]
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        gaps.append(" or ".join(TOKENIZER_FILES))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        gaps += [s for s in shards if not (root / s).is_file()]
    elif not (root / "model.safetensors").is_file():
        gaps.append("model.safetensors (or model.safetensors.index.json and its shards)")
    return gaps


def cached_bytes(need: Need, cache: Path) -> int:
    root = snapshot(need, cache)
    if root is None:
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and _wanted(need, str(p.relative_to(root))))


def _wanted(need: Need, name: str) -> bool:
    return any(fnmatch.fnmatch(name, a) for a in need.allow) and not any(fnmatch.fnmatch(name, i) for i in need.ignore)


# ---------------------------------------------------------------------------------------------- the network


def check_access(need: Need, token: str | None) -> None:
    """A one-line error when the repository is gated (and the token missing or refused) or absent."""
    from huggingface_hub import HfApi  # noqa: PLC0415
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError  # noqa: PLC0415

    url = f"https://huggingface.co/{'datasets/' if need.repo_type == 'dataset' else ''}{need.repo_id}"
    try:
        HfApi().auth_check(need.repo_id, repo_type=need.repo_type, token=token)
    except GatedRepoError:
        held = "HF_TOKEN is not set" if not token else "your token was refused"
        raise UserError(
            f"{need.repo_id} is gated and {held}: accept its license at {url} with your account, then "
            "`export HF_TOKEN=hf_...` (a read token from https://huggingface.co/settings/tokens)"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{need.label} not found on the Hub (or private without access); check the id in the registry or task spec"
        ) from None
    except HfHubHTTPError as e:
        why = str(e).splitlines()[0]
        raise UserError(f"the Hub refused {need.repo_id} ({why}); check HF_TOKEN and the id") from None


def remote_files(need: Need, token: str | None) -> dict[str, int]:
    """File -> bytes of what `fetch` would download."""
    from huggingface_hub import HfApi  # noqa: PLC0415

    api = HfApi()
    info = (api.model_info if need.repo_type == "model" else api.dataset_info)(
        need.repo_id, revision=need.revision, files_metadata=True, token=token
    )
    return {s.rfilename: s.size or 0 for s in info.siblings or [] if _wanted(need, s.rfilename)}


def fetch(need: Need, cache: Path, token: str | None) -> Path:
    """Download `need` into the cache (resumes; skips what is there) and return its snapshot folder."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415

    return Path(
        snapshot_download(
            need.repo_id,
            repo_type=need.repo_type,
            revision=need.revision,
            allow_patterns=list(need.allow),
            ignore_patterns=list(need.ignore) or None,
            cache_dir=str(cache),
            token=token,
        )
    )


def dataset_folder(need: Need) -> Path:
    """For the worker: the snapshot holding a task's split files, from this environment's cache (downloaded
    first unless offline). One-line errors name the task, the repository and the fix."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError  # noqa: PLC0415

    cache = hub_cache()
    if offline():
        root = snapshot(need, cache)
        if root is None:
            raise UserError(
                f"{need.what}: {need.label} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE "
                f"is set; run `launch prefetch --task {need.name}` where the Hub is reachable"
            )
        return root
    try:
        return fetch(need, cache, None)
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise UserError(
            f"{need.what}: {need.label} cannot be read ({type(e).__name__}); check the repository and HF_TOKEN"
        ) from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"{need.what}: {need.label} could not be downloaded (no network?) and is not in {cache}; "
            "run `launch prefetch` where the Hub is reachable"
        ) from None

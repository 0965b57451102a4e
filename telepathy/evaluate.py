"""Evaluation: every method's accuracy on the eval split, read two ways, the per-example predictions, and
per-sample latency.

A method (config.METHODS) is a *prefix*: what a causal LM reads before it answers, as input embeddings with
a left-padding mask, the same for both readings of it:
- bridge / prompt_tuning / lora: the trained model's own layout (TelepathyModel.prefix):
  [primer, K soft tokens] / [task prompt, K soft tokens] / [task prompt] (through the LoRA adapters);
- receiver:           the receiver with the primer only. It never sees the text, so it cannot beat chance:
                      the floor. Its input is the same for every example: generated and scored once;
- receiver_zero_shot: the receiver reads the task prompt around the text (the paper's "Mistral 0-shot");
- sender_zero_shot:   the FULL sender reads it (the paper's "Llama 0-shot");
- receiver_k_shot:    k labelled train examples balanced over the classes (data.k_shot_demos, seeded by
                      train.seed), each as prompt + answer, then the example's prompt;
- text_relay:         the sender writes `relay_tokens` tokens for the task spec's `relay_prompt`; the receiver
                      reads `TaskSpec.relay_text(summary)`.
The two readings:
- generation: greedy (loading.greedy, the one generation config), matched to a label by `TaskSpec.match` (the
  first label word, or synonym, that occurs as a whole word in the lower-cased text);
- label scoring: each label word's tokens (" {label}", as the answer starts) after the prefix, summed
  log-likelihood, all labels of a batch in one forward; the most likely label is the scored prediction.
Every example of every method is one line of predictions.jsonl (`Record`): what every statistic of
`launch report` is recomputed from. The linear probe has no generation; its records carry the classifier's
log-probabilities as the per-label scores.

Latency: batch 1, warm-ups first, the prefix (tokenisation included) inside the timed region, CUDA
synchronised before each clock read, for the bridge, the receiver reading the text, and the text relay.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from telepathy.config import FULL_SENDER, METHODS, DataConfig, EvalConfig
from telepathy.data import Collator, Example, PromptTokenizer, Task, k_shot_demos
from telepathy.loading import complete_model, greedy, load_model, select_attention
from telepathy.metrics import Progress
from telepathy.registry import Pair
from telepathy.step import TelepathyModel, answer_logits

SCHEMA = 2  # of eval.json: 2 added label scoring (scored_accuracy), the run's method and example ids
LATENCY_WARMUP = 3
LATENCY_METHODS = ("bridge", "receiver_zero_shot", "text_relay")
SCORE_ROWS = 256  # at most this many (example, label) rows per scoring forward (tasks with many labels)


@dataclass
class Prefix:
    """What `lm` reads before it answers: (B,P,d) embeddings, left-padded under `mask` (None: no padding)."""

    lm: nn.Module
    tok: Any
    embeds: torch.Tensor
    mask: torch.Tensor | None

    def __len__(self) -> int:
        return self.embeds.size(0)

    def select(self, rows: slice) -> Prefix:
        return Prefix(self.lm, self.tok, self.embeds[rows], None if self.mask is None else self.mask[rows])


def embed_rows(lm: nn.Module, rows: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """Token rows, left-padded (generation appends after the last real token of every row), as `lm`'s input
    embeddings and their mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return lm.get_input_embeddings()(ids.to(device)), mask.to(device)


def generate(p: Prefix, max_new_tokens: int) -> list[str]:
    mask = p.mask if p.mask is not None else torch.ones(p.embeds.shape[:2], dtype=torch.long, device=p.embeds.device)
    out = greedy(p.lm, p.tok, max_new_tokens, inputs_embeds=p.embeds, attention_mask=mask)
    return p.tok.batch_decode(out, skip_special_tokens=True)  # only new tokens with inputs_embeds


def label_loglik(p: Prefix, labels: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, L) summed log-likelihood of each label's tokens after each prefix: one forward of B x L rows
    (chunks of SCORE_ROWS rows for tasks with many labels)."""
    n_labels = len(labels)
    width = max(len(x) for x in labels)
    device = p.embeds.device
    ids = torch.zeros((n_labels, width), dtype=torch.long, device=device)
    amask = torch.zeros((n_labels, width), dtype=torch.long, device=device)
    for j, x in enumerate(labels):
        ids[j, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        amask[j, : len(x)] = 1
    step = max(1, SCORE_ROWS // n_labels)
    out = []
    for i in range(0, len(p), step):
        part = p.select(slice(i, i + step))
        b = len(part)
        embeds = part.embeds.repeat_interleave(n_labels, 0)
        mask = None if part.mask is None else part.mask.repeat_interleave(n_labels, 0)
        a_ids, a_mask = ids.repeat(b, 1), amask.repeat(b, 1)
        logits = answer_logits(part.lm, embeds, mask, a_ids, a_mask)
        logp = F.log_softmax(logits, -1).gather(-1, a_ids.reshape(-1, 1)).view(b * n_labels, width)
        out.append((logp * a_mask).sum(-1).view(b, n_labels))
    return torch.cat(out)


def record(method: str, example: Example, labels: Sequence[str], generated: str | None, match, scores) -> dict:
    """One line of predictions.jsonl."""
    scores = [float(s) for s in scores]
    gen = match(generated) if generated is not None else None
    return {
        "method": method,
        "id": example.id,
        "gold": labels[example.label],
        "generated": generated,
        "generated_label": None if gen is None else labels[gen],
        "scored_label": labels[max(range(len(scores)), key=scores.__getitem__)],
        "loglik": {w: s if math.isfinite(s) else None for w, s in zip(labels, scores)},  # JSON has no -inf
    }


def summarize(records: Sequence[dict], labels: Sequence[str], generates: bool = True) -> dict:
    """A method's entry in eval.json, from its records: accuracy by generation (None for a method that does
    not generate) and by label scoring, per class, unmatched generations, the first generations."""
    per_class = {w: {"n": 0, "correct": 0, "scored_correct": 0} for w in labels}
    for r in records:
        c = per_class[r["gold"]]
        c["n"] += 1
        c["correct"] += int(r["generated_label"] == r["gold"])
        c["scored_correct"] += int(r["scored_label"] == r["gold"])
    n = len(records)
    correct = sum(c["correct"] for c in per_class.values())
    scored = sum(c["scored_correct"] for c in per_class.values())
    return {
        "n": n,
        "accuracy": correct / n if generates and n else None,
        "scored_accuracy": scored / n if n else None,
        "correct": correct if generates else None,
        "scored_correct": scored,
        "per_class": per_class,
        "unmatched": sum(r["generated_label"] is None for r in records) if generates else None,
        "samples": [r["generated"] for r in records[:5]] if generates else [],
    }


class Evaluator:
    """One evaluation's fixed parts: models, tokenizers, collator, generation settings, k-shot demos."""

    def __init__(
        self,
        task: Task,
        tokenizers,
        eval_cfg: EvalConfig,
        data_cfg: DataConfig,
        device: torch.device,
        *,
        model: TelepathyModel | None = None,
        receiver_lm: nn.Module | None = None,
        sender_lm: nn.Module | None = None,
        seed: int = 0,
    ):
        self.task, self.cfg, self.device, self.model, self.seed = task, eval_cfg, device, model, seed
        self.sender_tok, self.receiver_tok = tokenizers
        reads = model.reads if model is not None else "sender"
        self.collate = Collator(
            task.spec, self.sender_tok, self.receiver_tok, data_cfg.max_length, data_cfg.answer_length, reads=reads
        )
        self.receiver_lm = receiver_lm if receiver_lm is not None else (model.receiver.lm if model else None)
        self.sender_lm = sender_lm
        self.label_ids = {"receiver": self.collate.label_ids(self.receiver_tok)}
        self.label_ids["sender"] = self.collate.label_ids(self.sender_tok)
        self._primer: tuple[str, torch.Tensor] | None = None
        self._shots: str | None = None
        # k-shot prompts hold k examples and the text: room for all of them
        self._k_shot = PromptTokenizer(self.receiver_tok, data_cfg.max_length * (eval_cfg.k_shot + 1))

    # ------------------------------------------------------------ prefixes per method
    def _ids(self, lm: nn.Module, tok, rows: Sequence[Sequence[int]]) -> Prefix:
        return Prefix(lm, tok, *embed_rows(lm, rows, tok.pad_token_id, self.device))

    def _receiver(self, rows) -> Prefix:
        return self._ids(self.receiver_lm, self.receiver_tok, rows)

    def trained(self, examples: Sequence[Example]) -> Prefix:
        """bridge, prompt_tuning, lora: the model's own layout."""
        embeds, mask = self.model.prefix(self.collate(examples).to(self.device))
        return Prefix(self.model.receiver.lm, self.receiver_tok, embeds, mask)

    def receiver(self, examples: Sequence[Example]) -> Prefix:
        return self._receiver([self.collate.primer_ids])  # one row: the same input for every example

    def receiver_zero_shot(self, examples: Sequence[Example]) -> Prefix:
        return self._receiver(self.collate.receiver_examples(examples))

    def sender_zero_shot(self, examples: Sequence[Example]) -> Prefix:
        return self._ids(self.sender_lm, self.sender_tok, self.collate.sender_examples(examples))

    def receiver_k_shot(self, examples: Sequence[Example]) -> Prefix:
        spec = self.task.spec
        if self._shots is None:
            demos = k_shot_demos(self.task.train, len(spec.labels), self.cfg.k_shot, self.seed)
            self._shots = "".join(spec.sender_text(d.text, d.extra) + spec.answer_text(d.label) + "\n\n" for d in demos)
        shots = self._shots
        rows = self._k_shot.rows(
            lambda t, x: shots + spec.sender_text(t, x), [e.text for e in examples], [e.extra for e in examples]
        )
        return self._receiver(rows)

    def text_relay(self, examples: Sequence[Example]) -> Prefix:
        spec = self.task.spec
        asks = self.collate.sender.rows(lambda t, x: spec.relay_prompt.replace("{text}", t), [e.text for e in examples])
        summaries = generate(self._ids(self.sender_lm, self.sender_tok, asks), self.cfg.relay_tokens)
        return self._receiver(
            self.collate.receiver.rows(lambda t, x: spec.relay_text(t), [s.strip() for s in summaries])
        )

    def prefix_fn(self, method: str) -> Callable[[Sequence[Example]], Prefix]:
        return self.trained if METHODS[method].trains else getattr(self, method)

    # ------------------------------------------------------------ both readings, and timing
    def readings(self, method: str, examples: Sequence[Example]) -> tuple[list[str], torch.Tensor]:
        """(generated texts, (B, L) label log-likelihoods) of one batch."""
        side = "sender" if method == "sender_zero_shot" else "receiver"
        if method == "receiver":  # the same input for every example: generate and score it once
            if self._primer is None:
                p = self.receiver(examples)
                self._primer = (generate(p, self.cfg.max_new_tokens)[0], label_loglik(p, self.label_ids[side])[0])
            text, scores = self._primer
            return [text] * len(examples), scores.expand(len(examples), -1)
        p = self.prefix_fn(method)(examples)
        return generate(p, self.cfg.max_new_tokens), label_loglik(p, self.label_ids[side])

    def run(self, method: str, progress: Callable[[int], None] = lambda n: None) -> tuple[dict, list[dict]]:
        labels, match = self.task.spec.labels, self.task.spec.match
        records = []
        examples = self.task.eval
        with self._context(method):
            for i in range(0, len(examples), self.cfg.batch_size):
                chunk = examples[i : i + self.cfg.batch_size]
                texts, scores = self.readings(method, chunk)
                records += [record(method, e, labels, t, match, s.tolist()) for e, t, s in zip(chunk, texts, scores)]
                progress(len(chunk))
        return summarize(records, labels), records

    def latency(self, method: str) -> dict:
        examples = self.task.eval
        n = min(self.cfg.latency_samples, len(examples))
        times = []
        with self._context(method):
            for i in range(LATENCY_WARMUP + n):
                example = examples[i % len(examples)]
                self._sync()
                start = time.perf_counter()
                generate(self.prefix_fn(method)([example]), self.cfg.max_new_tokens)
                self._sync()
                if i >= LATENCY_WARMUP:
                    times.append((time.perf_counter() - start) * 1000)
        return {"median": statistics.median(times), "mean": statistics.fmean(times), "n": n}

    def _context(self, method: str):
        """A baseline on a LoRA run reads the receiver without the adapters."""
        if self.model is not None and not METHODS[method].trains:
            return self.model.baseline()
        return torch.no_grad()  # any context: evaluate() already runs under no_grad

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def full_sender(
    pair: Pair,
    device: torch.device | str,
    attention: str = "auto",
    *,
    body: nn.Module | None = None,
    receiver_lm: nn.Module | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """The whole sender causal LM for sender_zero_shot and text_relay. A single-model pair reuses the receiver;
    with the training body (its layers up to the tap) only the missing layers, final norm and LM head are
    added (loading.complete_model); otherwise it is loaded whole."""
    if pair.single and receiver_lm is not None:
        return receiver_lm
    if body is not None:
        return complete_model(pair.sender, body, device=device)
    device = torch.device(device)
    return load_model(
        pair.sender, device=device, attn_implementation=select_attention(device, attention)[0], dtype=dtype
    )


def methods_needing(methods: Sequence[str]) -> dict[str, bool]:
    """Which models an evaluation of these methods needs: the receiver, the full sender."""
    return {
        "receiver": any(m not in ("sender_zero_shot", "linear_probe") for m in methods),
        "full_sender": any(m in FULL_SENDER for m in methods),
    }


def evaluate(
    methods: Sequence[str],
    task: Task,
    tokenizers,
    eval_cfg: EvalConfig,
    device: torch.device | str,
    *,
    data_cfg: DataConfig | None = None,
    model: TelepathyModel | None = None,
    receiver_lm: nn.Module | None = None,
    sender_lm: nn.Module | None = None,
    seed: int = 0,
    given: dict[str, list[dict]] | None = None,
) -> tuple[dict, list[dict]]:
    """(eval.json, the predictions.jsonl records) of `methods` on `task.eval`, every method on the same
    examples. A trained method (bridge, prompt_tuning, lora) reads through `model` (unwrapped: no DDP/FSDP,
    on the rank that evaluates); the others need `receiver_lm` (or the model's receiver) and, for
    sender_zero_shot and text_relay, `sender_lm` (full_sender); without the models they need they are listed
    under "skipped". `given` holds records computed elsewhere (the linear probe's)."""
    device = torch.device(device)
    given = given or {}
    ev = Evaluator(
        task, tokenizers, eval_cfg, data_cfg or DataConfig(), device,
        model=model, receiver_lm=receiver_lm, sender_lm=sender_lm, seed=seed,
    )  # fmt: skip

    def available(m: str) -> bool:
        if m in given:
            return True
        if METHODS[m].trains:
            return model is not None and model.method == m
        return (ev.receiver_lm is not None or m == "sender_zero_shot") and (
            m not in FULL_SENDER or sender_lm is not None
        )

    skipped = [m for m in methods if not available(m)]
    scored = [m for m in methods if m not in skipped]
    result: dict = {
        "schema": SCHEMA,
        "task": task.spec.name,
        "n": len(task.eval),
        "labels": list(task.spec.labels),
        "ids": [e.id for e in task.eval],
        "max_new_tokens": eval_cfg.max_new_tokens,
        "methods": {},
        "latency_ms": {},
        "skipped": skipped,
    }
    records: list[dict] = []
    total = sum(len(task.eval) for m in scored if m not in given)
    progress, done = Progress(total, every=max(1, total // 10), label="eval", unit="sample"), 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        progress.update(done)

    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        with torch.no_grad():
            for m in scored:
                if m in given:
                    result["methods"][m], part = summarize(given[m], task.spec.labels, generates=False), given[m]
                else:
                    result["methods"][m], part = ev.run(m, tick)
                records += part
            if eval_cfg.latency_samples > 0:
                for m in LATENCY_METHODS:
                    if m in result["methods"]:
                        result["latency_ms"][m] = ev.latency(m)
    finally:
        progress.close()
        if model is not None:
            model.train(was_training)
    result["accuracy"] = {m: r["accuracy"] for m, r in result["methods"].items()}
    result["scored_accuracy"] = {m: r["scored_accuracy"] for m, r in result["methods"].items()}
    return result, records


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_eval_table(result: dict) -> str:
    """A plain-text table of eval.json: accuracy by generation and by label scoring, unmatched generations
    and latency per method."""
    rows = [("method", "accuracy", "scored", "unmatched", "latency ms (median)")]
    for method, r in result["methods"].items():
        lat = result["latency_ms"].get(method)
        unmatched = "-" if r.get("unmatched") is None else str(r["unmatched"])
        rows.append(
            (
                method,
                _pct(r["accuracy"]),
                _pct(r.get("scored_accuracy")),
                unmatched,
                f"{lat['median']:.1f}" if lat else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"task {result['task']}: n={result['n']}, chance {100 / len(result['labels']):.1f}%"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if result.get("skipped"):
        lines.append(f"skipped (the models they need were not loaded): {', '.join(result['skipped'])}")
    return "\n".join(lines)

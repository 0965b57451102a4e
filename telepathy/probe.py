"""The linear probe: what a linear classifier reads from the sender's states at the bridge's tapped layer.

Features: the sender body (the same `source_layer` the bridge taps, the same prompt and truncation the bridge
reads) run over each example, its states mean-pooled over the real tokens. The original probed another layer
(`layers[16]`, hidden_states[17], against the bridge's 31) and pooled the last token; its review called the
comparison unfair, so here the probe sees exactly what the bridge sees.

Classifier: scikit-learn's LogisticRegression (lbfgs, L2, C=1) on standardised features, not a torch linear
head: the problem is convex and lbfgs solves it to convergence, so the probe has no learning rate, epochs or
seed to tune or to report spread over (it is deterministic, one run per pair and task), and the features of
these splits fit in host memory (120k x 4096 fp32 = 2 GB for AG News on an 8B sender).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from telepathy.data import Collator, Example
from telepathy.evaluate import record
from telepathy.metrics import Progress

MAX_ITER = 1000


@torch.no_grad()
def features(
    body: nn.Module, collator: Collator, examples: Sequence[Example], device: torch.device, batch_size: int
) -> np.ndarray:
    """(N, d_sender) float32: each example's tapped-layer states, mean over its real tokens."""
    out = []
    progress = Progress(len(examples), every=max(1, len(examples) // 10), label="probe features", unit="example")
    try:
        for i in range(0, len(examples), batch_size):
            batch = collator(examples[i : i + batch_size]).to(device)
            states = body(input_ids=batch.sender_ids, attention_mask=batch.sender_mask, use_cache=False)
            mask = batch.sender_mask.unsqueeze(-1).to(torch.float32)
            pooled = (states.last_hidden_state.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(pooled.cpu().numpy())
            progress.update(min(i + batch_size, len(examples)))
    finally:
        progress.close()
    return np.concatenate(out)


def fit(train_features: np.ndarray, labels: Sequence[int]):
    """The fitted probe: standardisation, then multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415  (scikit-learn only for the probe)
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=MAX_ITER))
    return probe.fit(train_features, np.asarray(labels))


def records(probe, eval_features: np.ndarray, examples: Sequence[Example], labels: Sequence[str]) -> list[dict]:
    """predictions.jsonl lines: no generation; the class log-probabilities are the per-label scores."""
    logp = np.full((len(examples), len(labels)), -np.inf)
    logp[:, probe.classes_] = probe.predict_log_proba(eval_features)  # classes absent from training: never
    return [record("linear_probe", e, labels, None, None, row) for e, row in zip(examples, logp)]

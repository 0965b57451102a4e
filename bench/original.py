"""A faithful reproduction of the ORIGINAL system's training step, for the benchmark only (train_step in
telepathy/train_telepathy.py of the original LatentWire repository):

- the full sender (every layer, final norm and LM head) runs under no_grad with output_hidden_states=True
  and the HF default use_cache, and the bridge reads hidden_states[tap];
- every sender input is padded to the fixed max_length, every answer to answer_length (16) with EOS;
- the receiver gets inputs_embeds [primer, soft, answer] and HF `labels` (-100 on primer, soft tokens and
  answer padding), so it computes logits over EVERY position and HF's loss;
- loss = CE + 0.1 x batch diversity; bf16 bridge, AdamW, grad-norm clip 1.0.

- the bridge is the original's PerceiverResampler (OriginalPerceiver: nn.MultiheadAttention, no input
  LayerNorm), trained with torch's default AdamW (foreach).

The benchmark's loss check runs this step with the project's Bridge instead, so that the two losses compare
the same function and differ only in what the fast path removes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from telepathy.step import batch_diversity


@dataclass
class OriginalBatch:
    sender_ids: torch.Tensor  # (B, max_length)
    sender_mask: torch.Tensor
    primer_ids: torch.Tensor  # (B, P)
    answer_ids: torch.Tensor  # (B, answer_length) EOS-padded
    answer_mask: torch.Tensor

    def __len__(self) -> int:
        return self.sender_ids.size(0)

    def to(self, device) -> OriginalBatch:
        return OriginalBatch(
            *(
                t.to(device)
                for t in (self.sender_ids, self.sender_mask, self.primer_ids, self.answer_ids, self.answer_mask)
            )
        )


def original_batch(
    sender_rows: list[list[int]],
    answer_rows: list[list[int]],
    primer: list[int],
    *,
    max_length: int,
    answer_length: int,
    sender_pad: int,
    eos: int,
) -> OriginalBatch:
    """The original's tokenizer call: padding="max_length", truncation, pad token = EOS for the answer."""
    b = len(sender_rows)
    ids = torch.full((b, max_length), sender_pad, dtype=torch.long)
    mask = torch.zeros((b, max_length), dtype=torch.long)
    ans = torch.full((b, answer_length), eos, dtype=torch.long)
    amask = torch.zeros((b, answer_length), dtype=torch.long)
    for i, (s, a) in enumerate(zip(sender_rows, answer_rows)):
        s, a = s[:max_length], a[:answer_length]
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        ans[i, : len(a)], amask[i, : len(a)] = torch.tensor(a), 1
    return OriginalBatch(ids, mask, torch.tensor([primer] * b), ans, amask)


class OriginalPerceiver(nn.Module):
    """The original's PerceiverResampler: K latents in the receiver's width,
    Linear input projection when widths differ, pre-LN blocks of nn.MultiheadAttention cross- and
    self-attention and a GELU MLP, per-token RMS normalisation times a learnable scale."""

    def __init__(self, src_dim: int, tgt_dim: int, soft_tokens: int, heads: int, depth: int, target_rms: float):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(soft_tokens, tgt_dim) * 0.02)
        self.input_proj = nn.Linear(src_dim, tgt_dim) if src_dim != tgt_dim else nn.Identity()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(tgt_dim),
                    "cross": nn.MultiheadAttention(tgt_dim, heads, batch_first=True),
                    "ln2": nn.LayerNorm(tgt_dim),
                    "self": nn.MultiheadAttention(tgt_dim, heads, batch_first=True),
                    "ln3": nn.LayerNorm(tgt_dim),
                    "ffn": nn.Sequential(nn.Linear(tgt_dim, 4 * tgt_dim), nn.GELU(), nn.Linear(4 * tgt_dim, tgt_dim)),
                }
            )
            for _ in range(depth)
        )
        self.output_scale = nn.Parameter(torch.tensor(float(target_rms)))

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        keys = self.input_proj(src.to(self.latents.dtype))
        x = self.latents.unsqueeze(0).expand(src.size(0), -1, -1)
        for b in self.blocks:
            q = b["ln1"](x)
            x = x + b["cross"](q, keys, keys, key_padding_mask=src_mask == 0, need_weights=False)[0]
            q = b["ln2"](x)
            x = x + b["self"](q, q, q, need_weights=False)[0]
            x = x + b["ffn"](b["ln3"](x))
        rms = torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-8)
        return (x.float() / rms * self.output_scale.float()).to(x.dtype)


class OriginalStep(nn.Module):
    """forward(batch) -> loss, exactly as the original computed it."""

    def __init__(
        self, sender_lm: nn.Module, bridge: nn.Module, receiver_lm: nn.Module, tap: int, diversity_weight: float = 0.1
    ):
        super().__init__()
        self.sender_lm, self.bridge, self.receiver_lm = sender_lm, bridge, receiver_lm
        self.tap, self.diversity_weight = tap, diversity_weight

    def forward(self, batch: OriginalBatch) -> torch.Tensor:
        with torch.no_grad():
            out = self.sender_lm(
                input_ids=batch.sender_ids, attention_mask=batch.sender_mask, output_hidden_states=True
            )
            src_h = out.hidden_states[self.tap]
        soft = self.bridge(src_h, batch.sender_mask)
        embed = self.receiver_lm.get_input_embeddings()
        primer, answer = embed(batch.primer_ids), embed(batch.answer_ids)
        inputs = torch.cat([primer, soft.to(primer.dtype), answer], dim=1)
        b, p, k, dev = primer.size(0), primer.size(1), soft.size(1), inputs.device
        labels = torch.cat(
            [
                torch.full((b, p + k), -100, dtype=torch.long, device=dev),
                batch.answer_ids.masked_fill(batch.answer_mask == 0, -100),
            ],
            dim=1,
        )
        mask = torch.cat([torch.ones(b, p + k, dtype=torch.long, device=dev), batch.answer_mask], dim=1)
        lm_loss = self.receiver_lm(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
        return lm_loss + self.diversity_weight * batch_diversity(soft)

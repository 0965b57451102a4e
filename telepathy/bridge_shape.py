"""The bridge's shape facts, torch-free: its exact parameter count in closed form (tests check it against
telepathy/bridge.py) and the sender layer it taps. The memory model and the step both use them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from telepathy.errors import UserError

if TYPE_CHECKING:
    from telepathy.config import BridgeConfig
    from telepathy.registry import ModelSpec


def bridge_param_count(cfg: BridgeConfig, src_dim: int, tgt_dim: int) -> int:
    """Parameters of `Bridge(cfg, src_dim, tgt_dim)` (cfg: a BridgeConfig). Per block at width d = tgt_dim:
    cross- and self-attention 4d^2 + 3d each (q, k, v and out projections; no key bias), MLP
    2rd^2 + (r+1)d for mlp_ratio r, three LayerNorms 6d. Plus K*d latents, the input LayerNorm
    (2*src_dim), the input projection (src_dim*d + d, only when the widths differ) and the scalar
    output scale."""
    d, r = tgt_dim, cfg.mlp_ratio
    block = 2 * (4 * d * d + 3 * d) + (2 * r * d * d + (r + 1) * d) + 6 * d
    input_proj = src_dim * d + d if src_dim != d else 0
    return cfg.depth * block + cfg.soft_tokens * d + 2 * src_dim + input_proj + 1


def source_layer(cfg: BridgeConfig, sender: ModelSpec) -> int:
    """The tapped layer as an index into HF `hidden_states` (0 = embeddings); None -> layers - 1."""
    layer = sender.layers - 1 if cfg.source_layer is None else cfg.source_layer
    if not 0 <= layer <= sender.layers:
        raise UserError(
            f"source_layer {layer} is outside 0..{sender.layers} for {sender.alias}; "
            f"pick a hidden_states index of the sender (default {sender.layers - 1})"
        )
    return layer

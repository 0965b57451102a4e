"""The dry run's FLOP counts (telepathy/shape.py) against torch's own FlopCounterMode on the same computation:
full-size decoders on the meta device (no weights, no compute), the bridge at a small width on the CPU."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from telepathy.config import BridgeConfig
from telepathy.registry import load_registry
from telepathy.shape import bridge_flops, decoder_flops

REG = load_registry()


def _counted(module, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("alias", ["llama8b", "qwen7b"])
def test_decoder_forward_flops_match_torchs_count(alias):
    from telepathy.loading import load_model

    spec = REG.get(alias)
    lm = load_model(spec, device="meta", attn_implementation="sdpa")
    ids = torch.zeros((2, 24), dtype=torch.long, device="meta")
    # a masked SDPA call computes the full square of scores: counted that way here (causal=False)
    assert _counted(lm, input_ids=ids, logits_to_keep=3) == pytest.approx(
        2 * decoder_flops(spec, 24, head_tokens=3, causal=False), rel=1e-9
    )


def test_bridge_forward_flops_match_torchs_count():
    from telepathy.bridge import Bridge

    cfg = BridgeConfig(soft_tokens=8, depth=2, heads=4)
    bridge = Bridge(cfg, 96, 64, 1.0)
    states, keep = torch.zeros(2, 40, 96), torch.ones(2, 40, dtype=torch.long)
    with sdpa_kernel(SDPBackend.MATH):  # attention as matrix products, which the counter sees on a CPU
        assert _counted(bridge, states, keep) == pytest.approx(2 * bridge_flops(cfg, 96, 64, 40), rel=1e-9)

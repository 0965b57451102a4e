"""The bridge: shapes, masking, output scale, and the torch-free closed-form parameter count."""

import pytest
import torch

from telepathy.bridge import Bridge, target_rms_of
from telepathy.bridge_shape import bridge_param_count
from telepathy.config import BridgeConfig
from telepathy.errors import UserError


@pytest.mark.parametrize(
    "src,tgt,cfg",
    [
        (64, 96, BridgeConfig(soft_tokens=8, depth=2, heads=4)),
        (96, 96, BridgeConfig(soft_tokens=3, depth=1, heads=8, mlp_ratio=2)),  # Identity input projection
        (48, 32, BridgeConfig(soft_tokens=1, depth=3, heads=2)),
    ],
)
def test_param_count_closed_form_matches_module(src, tgt, cfg):
    bridge = Bridge(cfg, src, tgt, target_rms=0.5)
    assert sum(p.numel() for p in bridge.parameters()) == bridge_param_count(cfg, src, tgt)


def test_param_count_at_full_size_matches_the_original_plus_input_norm_minus_key_bias():
    # The original's bridge at d=4096, depth 2, K=8 has 537,059,329 parameters; this one adds a 2*d_S input LayerNorm
    # and drops the key bias (d per attention, 2 attentions per block: softmax cancels it).
    assert bridge_param_count(BridgeConfig(soft_tokens=8, depth=2), 4096, 4096) == 537_059_329 + 2 * 4096 - 2 * 2 * 4096
    with torch.device("meta"):
        bridge = Bridge(BridgeConfig(soft_tokens=32, depth=2, heads=32), 4096, 3584, 0.01)
    assert sum(p.numel() for p in bridge.parameters()) == bridge_param_count(BridgeConfig(soft_tokens=32), 4096, 3584)


def test_shapes_scale_and_padding_invariance():
    torch.manual_seed(0)
    cfg = BridgeConfig(soft_tokens=5, depth=2, heads=4)
    bridge = Bridge(cfg, 24, 32, target_rms=0.25).eval()
    states, mask = torch.randn(3, 7, 24), torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    out = bridge(states, mask)
    assert out.shape == (3, 5, 32)
    torch.testing.assert_close(out.pow(2).mean(-1).sqrt(), torch.full((3, 5), 0.25), atol=1e-4, rtol=1e-4)
    # Padded positions are ignored: changing them, or dropping them, leaves row 1 unchanged.
    noisy = states.clone()
    noisy[1, 4:] = 100.0
    torch.testing.assert_close(bridge(noisy, mask)[1], out[1])
    torch.testing.assert_close(bridge(states[1:2, :4], mask[1:2, :4])[0], out[1], atol=1e-5, rtol=1e-5)
    # Real tokens matter (a new random vector: a constant shift would vanish in the input LayerNorm).
    changed = states.clone()
    changed[0, 2] = torch.randn(24)
    assert not torch.allclose(bridge(changed, mask)[0], out[0])


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("states", [torch.float32, torch.bfloat16])
def test_the_fp32_bridge_takes_either_dtype_with_or_without_autocast(states, autocast):
    bridge = Bridge(BridgeConfig(soft_tokens=2, depth=1, heads=2), 8, 8, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = bridge(torch.randn(2, 3, 8, dtype=states), torch.ones(2, 3))
    assert out.dtype == torch.float32 and out.shape == (2, 2, 8)  # soft tokens leave the bridge in fp32


def test_heads_must_divide_receiver_width():
    with pytest.raises(UserError, match="divide"):
        Bridge(BridgeConfig(heads=5), 8, 96, 0.1)


def test_target_rms_is_median_row_rms():
    emb = torch.nn.Embedding(5, 4)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor([[1.0] * 4, [2.0] * 4, [3.0] * 4, [100.0] * 4, [0.5] * 4]))

    class Model(torch.nn.Module):
        def get_input_embeddings(self):
            return emb

    assert target_rms_of(Model(), chunk=2) == pytest.approx(2.0)


def test_bridge_shape_is_torch_free():
    import subprocess
    import sys

    code = "import sys, telepathy.bridge_shape; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

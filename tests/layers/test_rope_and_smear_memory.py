"""cos/sin shared by every row are one row expanded (a stride-0 batch), and the smear makes no tensor from host
data (a sync on CUDA) (issue 28 item 6)."""

from __future__ import annotations

import pytest
import torch
from builders import tiny_config, tiny_model

from kvshift.layers.rope import RotaryEmbedding
from kvshift.layers.smear import TokenSmear


def test_shared_positions_give_a_stride_zero_batch():
    rope = RotaryEmbedding(tiny_config())
    x = torch.zeros(4, 9, 32)
    shared = (torch.arange(9) + 3)[None].expand(4, 9)
    cos, sin = rope(x, shared)
    assert cos.shape == sin.shape == (4, 9, 8)
    assert cos.stride(0) == 0 and sin.stride(0) == 0
    ref_cos, ref_sin = rope(x, shared.contiguous())  # the same positions, one copy per row
    assert ref_cos.stride(0) != 0
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    per_row = torch.stack([torch.arange(9), torch.arange(9) + 1, torch.arange(9), torch.arange(9) + 2])
    assert rope(x, per_row)[0].stride(0) != 0  # distinct rows stay distinct


@pytest.mark.parametrize("kv_shift", [True, False])
@torch.no_grad()
def test_model_with_default_positions_equals_explicit_rows(kv_shift):
    m = tiny_model(kv_shift=kv_shift)
    ids = torch.randint(3, 97, (3, 10))
    default = m(ids, use_cache=False).logits
    explicit = m(ids, position_ids=torch.arange(10).repeat(3, 1), use_cache=False).logits
    torch.testing.assert_close(default, explicit, atol=1e-6, rtol=1e-6)


def test_smear_makes_no_tensor_from_host_data(monkeypatch):
    smear = TokenSmear(32)
    with torch.no_grad():
        smear.smear_lambda.fill_(0.5)
        smear.smear_gate.normal_()
    x = torch.randn(2, 5, 32)
    expected = smear(x)

    def no_host_tensor(*args, **kwargs):
        raise AssertionError("torch.tensor in the smear's forward: a host-to-device copy (a sync on CUDA)")

    monkeypatch.setattr(torch, "tensor", no_host_tensor)
    out = smear(x)
    assert torch.equal(out, expected)
    torch.testing.assert_close(out[:, 1:], x[:, 1:] + 0.5 * torch.sigmoid(x[:, 1:, :24] @ smear.smear_gate)[..., None]
                               * x[:, :-1])
    assert torch.equal(out[:, 0], x[:, 0])  # no predecessor at a sequence start

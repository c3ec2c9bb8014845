"""The CPU linear path: oneDNN-packed weights give F.linear's result for any number of rows, in fp32 and bf16."""

import pytest
import torch
import torch.nn.functional as F

from engine.cpu_linear import PackableLinear, onednn_can_pack, pack_linear_weights, transpose_linear_storage
from engine.model import LoRALinear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 16, 37])
def test_packed_linear_equals_f_linear(dtype, rows):
    if not onednn_can_pack(dtype):
        pytest.skip(f"this torch build cannot pack {dtype}")
    torch.manual_seed(rows)
    lin = PackableLinear(96, 200).to(dtype)
    w = lin.weight.detach().clone()
    x = torch.randn(2 * rows, 96).to(dtype)[::2]  # a strided view: the packed path must not assume contiguity
    want = F.linear(x, w)
    assert pack_linear_weights(lin, dtype) == "onednn-packed"
    assert lin.weight is None and lin.packed is not None
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lin(x), want, **tol)


def test_packing_keeps_a_tied_embedding_and_the_lora_branch():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 32)
    head = PackableLinear(32, 50)
    head.weight = emb.weight  # tied, as the loader does
    o = LoRALinear(32, 32)
    o.set_lora(torch.randn(4, 32), torch.randn(32, 4), 0.5)
    model = torch.nn.ModuleDict(dict(emb=emb, head=head, o=o))
    x = torch.randn(5, 32)
    want_head, want_o = F.linear(x, emb.weight), o.forward_lora(x, True)
    want_base = o.forward_lora(x, False)
    pack_linear_weights(model, torch.float32)
    assert emb.weight.shape == (50, 32)  # the embedding still owns the tied tensor
    with torch.no_grad():
        torch.testing.assert_close(head(x), want_head, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(o.forward_lora(x, True), want_o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(o.forward_lora(x, False), want_base, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(o.forward_lora(x, True), o.forward_lora(x, False))


def test_fallback_layout_keeps_values():
    lin = PackableLinear(8, 12)
    w = lin.weight.detach().clone()
    transpose_linear_storage(lin)
    assert lin.weight.stride() == (1, 12) and torch.equal(lin.weight, w)

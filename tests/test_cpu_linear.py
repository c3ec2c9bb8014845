"""The CPU linear layouts: oneDNN-packed and column-major weights give F.linear's result, in fp32 and bf16."""

import pytest
import torch
import torch.nn.functional as F

from engine.cpu_linear import PackableLinear, onednn_can_pack, prepare_cpu_linears, transpose_linear_storage
from engine.model import LoRALinear

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


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
    prepare_cpu_linears(lin, lin, dtype)  # the module is its own "head": packed in every dtype
    assert lin.weight is None and lin.packed is not None
    torch.testing.assert_close(lin(x), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_keeps_a_tied_embedding_and_the_lora_branch(dtype):
    if not onednn_can_pack(dtype):
        pytest.skip(f"this torch build cannot pack {dtype}")
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 32).to(dtype)
    head = PackableLinear(32, 50).to(dtype)
    head.weight = emb.weight  # tied, as the loader does
    o = LoRALinear(32, 32).to(dtype)
    o.set_lora(torch.randn(4, 32), torch.randn(32, 4), 0.5)
    model = torch.nn.ModuleDict(dict(emb=emb, head=head, o=o))
    x = torch.randn(5, 32).to(dtype)
    with torch.no_grad():
        want_head, want_lora, want_base = F.linear(x, emb.weight), o.forward_lora(x, True), o.forward_lora(x, False)
        plan = prepare_cpu_linears(model, head, dtype)
        assert head.packed is not None and (o.packed is None) == (dtype == torch.float32), plan
        assert emb.weight.shape == (50, 32) and emb.weight.is_contiguous()  # the embedding keeps the tied tensor
        torch.testing.assert_close(head(x), want_head, **TOL[dtype])
        torch.testing.assert_close(o.forward_lora(x, True), want_lora, **TOL[dtype])
        torch.testing.assert_close(o.forward_lora(x, False), want_base, **TOL[dtype])
        assert not torch.allclose(o.forward_lora(x, True), o.forward_lora(x, False))


def test_column_major_layout_keeps_values():
    lin = PackableLinear(8, 12)
    w = lin.weight.detach().clone()
    transpose_linear_storage(lin)
    assert lin.weight.stride() == (1, 12) and torch.equal(lin.weight, w)

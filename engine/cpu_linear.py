"""CPU linear layers over oneDNN-packed weights: the decode GEMMs read the weights at a higher memory bandwidth.

On CPU a decode forward multiplies a handful of rows (one per running sequence) by every weight matrix, so its
time is the time to stream the weights from DRAM. MKL's sgemm behind `F.linear` repacks B on every call and
reaches 4-6 GB/s on one core of the CI machine at M = 16, where a plain read of the same bytes runs at 10 GB/s.
oneDNN's prepacked layout (`mkldnn::_reorder_linear_weight`, the layout torch.compile's CPU backend freezes weights
into) skips that repack, which pays off for the fp32 LM head and for every bf16 weight, not for fp32 decoder layers
(per shape and M: `python -m bench.linear`, docs/perf-offline.md "Packed weights"). Same weights, same
dtype; only the summation order differs (~1e-6 relative in fp32).

`prepare_cpu_linears(model, head, dtype)` picks per dtype which `PackableLinear`s get a packed copy (their row-major
weight is then dropped; a tied LM head's tensor stays alive as the embedding) and stores the rest column-major,
the layout MKL is fastest from. Builds without oneDNN, or dtypes it cannot pack, keep F.linear throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The batch size oneDNN picks the packed layout for. 16 was the fastest of 1 / 16 / 64 / none at M = 1, 16 and
# 1024 on the CI machine (SmolLM2 shapes), so one layout serves decode and prefill alike.
PACK_BATCH_HINT = 16


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ W^T for a weight packed by `pack_weight`; T may be anything (the hint only picks the layout)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The oneDNN-packed copy of a row-major [out, in] CPU weight (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)


class PackableLinear(nn.Linear):
    """`nn.Linear` without bias that runs from a packed weight once `prepare_cpu_linears` gave it one."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return packed_linear(x, self.packed)
        return F.linear(x, self.weight)


def onednn_can_pack(dtype: torch.dtype) -> bool:
    """Whether this torch build packs and multiplies `dtype` weights with oneDNN (checked on a tiny matrix)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(8, 4).to(dtype)
        x = torch.randn(3, 4).to(dtype)
        y = packed_linear(x, pack_weight(w))
        return bool(torch.allclose(y.float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2))
    except (RuntimeError, NotImplementedError):
        return False


def transpose_linear_storage(model: nn.Module) -> None:
    """Store every linear weight [out, in] column-major, i.e. as a contiguous [in, out] W^T: same values and shape.

    NOTE: MKL's sgemm computes x @ W^T 1.2-2.5x faster from a contiguous W^T than from nn.Linear's row-major W
    whenever M is not a multiple of 16. The fallback when oneDNN cannot pack.
    """
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight is not None}
    for w in weights.values():
        w.data = w.data.t().contiguous().t()


def _pack(modules: list[nn.Module]) -> None:
    for m in modules:
        if isinstance(m, PackableLinear) and m.packed is None:
            m.packed = pack_weight(m.weight)
            m.weight = None  # the packed copy replaces it (a tied head's tensor lives on in the embedding)


@torch.no_grad()
def prepare_cpu_linears(model: nn.Module, head: nn.Module, dtype: torch.dtype) -> str:
    """Lay out a CPU model's linear weights for inference; returns the kernel plan (for the startup log).

    fp32: the decoder layers stay on MKL over column-major weights, which measured as fast as or faster than the
    packed layout at M = 1, 16 and 64 on every layer shape; the LM head (the largest matrix, read by every decode
    step) is packed: 1.6x faster at M = 16, equal at M = 1. bf16 / fp16: every linear is packed (1.1-1.4x over
    F.linear at M = 1-64, `python -m bench.linear --dtype bfloat16`).
    """
    if not onednn_can_pack(dtype):
        transpose_linear_storage(model)
        return "mkl"
    if dtype == torch.float32:
        _pack([head])
        transpose_linear_storage(model)
        return "mkl (layers) + onednn-packed (head)"
    _pack(list(model.modules()))
    return "onednn-packed"

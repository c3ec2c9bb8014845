"""The model's glue ops, eager (`TorchOps`) or as fused CPU kernels (`FusedCpuOps`, engine/csrc/cpu_ops.cpp).

Between its GEMMs a forward runs RMSNorm (with the residual add before it), RoPE, SwiGLU's `silu(gate) * up` and
attention. Eagerly each is 3-8 tensor ops; on CPU at decode batch sizes every op costs a dispatch and a pass over
memory, and attention first gathers every sequence's KV pages into a padded batch for SDPA. `FusedCpuOps` does each
in one C++ call and reads the pages in place for one-query-per-sequence (decode) attention, also for the one-token
rows of a forward that mixes them with blocks and prefill chunks.

`TorchOps` is the reference: any device, dtype and autograd. The runner installs `FusedCpuOps` on a CPU model in
fp32 or bf16 (`EngineConfig.cpu_kernels`); the kernels take no gradients, so a model being trained keeps `TorchOps`.
`load_cpu_ops()` builds the extension once per machine and torch build (g++ and ninja needed; about 30 s, cached
under `$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`) and returns None, with a warning, when it cannot.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("trimode.engine")

SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.cpp"
# -march=native: the build is per machine (the name below hashes the CPU's flags, so a cache directory shared
# across machines never hands one CPU another's instructions). No -ffast-math, and no FMA contraction: NaN and
# every rounding stay those of the eager ops (`a * b + c * d` rounds both products, as two torch ops do).
CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=off"]
FUSED_DTYPES = (torch.float32, torch.bfloat16)


class TorchOps:
    """Eager reference implementations; see `FusedCpuOps` for the same seams fused."""

    name = "torch"
    decode_attention = None  # PagedContext gathers pages and runs SDPA

    @staticmethod
    def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight * rms_norm(r), r) with r = x + residual, or r = x without one. fp32 inside, as transformers."""
        if residual is not None:
            x = x + residual
        # torch's rms_norm on the fp32 copy gives the bits of `x * rsqrt(mean(x^2) + eps)` in 2 ops, not 6
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype), x

    @staticmethod
    def rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
        """The first `heads` heads of qkv [T, W] rotated as Llama / transformers -> [T, heads, D].

        x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]. `sin` [T, 1, D] arrives with its first
        half negated, so rotate_half(x) * sin is [x2, x1] * sin: the same products (negation is exact), with one
        flip instead of a negation and a concatenation.
        """
        d = cos.shape[-1]
        x = qkv[:, :heads * d].view(qkv.shape[0], heads, d)
        swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
        return x * cos + swapped * sin

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU's silu(gate) * up over gate_up [T, 2I] = [gate | up]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


TORCH_OPS = TorchOps()


class FusedCpuOps:
    """The C++ kernels behind `TorchOps`' seams (CPU, fp32 / bf16, inference only), plus paged decode attention."""

    name = "fused"

    def __init__(self, ext: Any) -> None:
        self._ext = ext

    def rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            residual = residual.contiguous()
        return self._ext.rms_norm(x.contiguous(), residual, weight.contiguous(), eps)

    def rope(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        # cos / sin are the model's [T, 1, D], contiguous: the kernel reads them as [T, D] rows
        return self._ext.rope(qkv, cos.contiguous(), sin.contiguous(), heads)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._ext.silu_mul(gate_up.contiguous())

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                         lens: torch.Tensor, block_size: int, rows: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """One query per sequence: softmax(q K^T / sqrt(D)) V over each sequence's first lens[b] cached keys.
        Flat caches [slots, Hkv, D], tables [B, max_blocks] and lens [B] int64. Without `rows`, q is [B, Hq, D] and
        the result a new [B, Hq, D]; with `rows` [B] int64, sequence b's query is q[rows[b]] of a ragged q [T, Hq,
        D] and its result is written to out[rows[b]] (`out` contiguous [T, Hq, D]; its other rows left alone)."""
        if q.stride(-1) != 1:
            q = q.contiguous()
        if rows is None:
            rows = torch.arange(tables.shape[0])
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype)
        self._ext.decode_attention(q, k_cache, v_cache, tables, rows, lens, out, block_size, q.shape[-1] ** -0.5)
        return out


_loaded: dict[str, FusedCpuOps | None] = {}


def _build_name() -> str:
    cpu_flags = ""
    try:
        cpu_flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    key = "\n".join([SOURCE.read_text(), " ".join(CFLAGS), torch.__version__, platform.machine(), cpu_flags])
    return "trimode_cpu_ops_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def load_cpu_ops() -> FusedCpuOps | None:
    """Build (first call on this machine) or load the CPU kernels; None, with a warning, when they cannot be built."""
    if "ops" in _loaded:
        return _loaded["ops"]
    ops = None
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if missing:
        log.warning("CPU kernels unavailable (no %s on PATH): the model runs eager torch ops", " or ".join(missing))
    else:
        try:
            from torch.utils.cpp_extension import load

            start = time.monotonic()
            ext = load(name=_build_name(), sources=[str(SOURCE)], extra_cflags=CFLAGS, verbose=False)
            ops = FusedCpuOps(ext)
            log.info("CPU kernels ready in %.1f s", time.monotonic() - start)
        except Exception as exc:  # noqa: BLE001 - any build or import failure means "not available"
            log.warning("CPU kernels unavailable (%s: %s): the model runs eager torch ops", type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
    _loaded["ops"] = ops
    return ops

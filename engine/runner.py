"""ModelRunner: turns a scheduled Batch into tensors, runs one forward over the paged cache, returns logit rows.

A batch mixes every kind of forward: its rows are flattened into one ragged token axis (no padding), so the
linear layers read the weights once for all of them; each sequence's mask (causal or bidirectional) and the
draft-LoRA rows travel in the `PagedContext`.

Owns the weights, the KV pool's memory and the device; which page belongs to whom is the scheduler's
(`BlockManager`), and each forward brings its sequences' block tables in the Batch. Sizing (`num_kv_blocks`): on
CUDA the pool takes `gpu_memory_utilization` of the device memory minus weights and an activation reserve; on CPU
it holds `num_kv_tokens` tokens.
"""

from __future__ import annotations

import logging

import torch

from engine.attention import DenseContext, KVCache, PagedContext, flash_available
from engine.batch import Batch
from engine.config import EngineConfig
from engine.cpu_kernels import FUSED_DTYPES, TORCH_OPS, FusedCpuOps, TorchOps, load_cpu_ops
from engine.cpu_linear import prepare_cpu_linears
from engine.loader import load_model

log = logging.getLogger("trimode.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str) -> None:
        self.device = pick_device(config.device)
        if self.device.type == "cpu" and config.num_threads is not None:
            torch.set_num_threads(config.num_threads)  # process-wide: the engine owns the process's compute
        self.dtype = pick_dtype(config.dtype, self.device)
        self.model, self.info = load_model(model_path, self.dtype, self.device)
        self.model.fuse_projections()
        self.linear_kernel = "cuda"
        self.ops: TorchOps | FusedCpuOps = TORCH_OPS
        if self.device.type == "cpu":
            self.linear_kernel = prepare_cpu_linears(self.model, self.model.diffusion_head, self.dtype)
            self.ops = self._cpu_ops(config.cpu_kernels)
            self.model.set_ops(self.ops)
        cfg = self.info.config
        self.block_size = config.kv_block_size
        self.num_kv_blocks = num_blocks = self._num_kv_blocks(config)
        self.cache = KVCache.allocate(cfg.num_hidden_layers, num_blocks, self.block_size, cfg.num_key_value_heads,
                                      cfg.head_dim, self.dtype, self.device)
        self.use_flash = config.use_flash_attn and flash_available(self.device, self.block_size)
        attention = "flash-attn" if self.use_flash else "sdpa"
        if self.ops.decode_attention is not None:
            attention += " (one-token rows: paged kernel)"
        log.info("KV cache: %d blocks x %d tokens = %d tokens (%s, %s, attention=%s, linear=%s, ops=%s)", num_blocks,
                 self.block_size, num_blocks * self.block_size, self.device, self.dtype, attention,
                 self.linear_kernel, self.ops.name)

    def _cpu_ops(self, mode: str) -> TorchOps | FusedCpuOps:
        if mode == "torch" or self.dtype not in FUSED_DTYPES:
            if mode == "fused":
                raise ValueError(f"cpu_kernels='fused' supports {FUSED_DTYPES}, not {self.dtype}")
            return TORCH_OPS
        ops = load_cpu_ops()
        if ops is None:
            if mode == "fused":
                raise RuntimeError("cpu_kernels='fused' but the CPU kernels could not be built (see the warning)")
            return TORCH_OPS
        return ops

    def _num_kv_blocks(self, config: EngineConfig) -> int:
        if self.device.type != "cuda":
            return config.num_kv_tokens // config.kv_block_size
        cfg = self.info.config
        free, total = torch.cuda.mem_get_info(self.device)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        reserve = 2 * 1024**3  # activations of the largest forward, allocator slack
        budget = total * config.gpu_memory_utilization - (total - free) - reserve
        per_block = 2 * cfg.num_hidden_layers * self.block_size * cfg.num_key_value_heads * cfg.head_dim
        per_block *= torch.tensor([], dtype=self.dtype).element_size()
        n = int(budget // per_block)
        if n < 1:
            raise ValueError(f"gpu_memory_utilization={config.gpu_memory_utilization} leaves no room for KV "
                             f"(weights {weights / 2**30:.1f} GiB)")
        return n

    @torch.inference_mode()
    def run(self, batch: Batch) -> list[torch.Tensor]:
        """One forward over every sequence of the batch, whatever each asked for (one pass over the weights); per
        sequence the logit rows it asked for ([rows, V] fp32)."""
        input_ids: list[int] = []
        q_lens: list[int] = []
        k_lens: list[int] = []
        causal: list[bool] = []
        rows: list[int] = []
        row_counts: list[int] = []
        lora_rows = 0  # the draft-LoRA sections lead the batch (engine/batch.py): their rows are one leading range
        for seq, req in zip(batch.seqs, batch.requests):
            n = len(req.token_ids)
            input_ids += req.token_ids
            if req.all_logits:
                rows += range(len(input_ids) - n, len(input_ids))
            else:
                rows.append(len(input_ids) - 1)
            row_counts.append(n if req.all_logits else 1)
            q_lens.append(n)
            k_lens.append(seq.num_computed_tokens + n)
            causal.append(req.forward.causal)
            if req.key.draft_lora:
                assert lora_rows == len(input_ids) - n, "draft-LoRA rows must lead the batch"
                lora_rows = len(input_ids)
        dev = self.device
        lora: bool | slice = False if lora_rows == 0 else True if lora_rows == len(input_ids) else slice(0, lora_rows)
        ctx = PagedContext(self.cache, q_lens, k_lens, causal, batch.block_tables, draft_lora=lora,
                           use_flash=self.use_flash, decode_kernel=self.ops.decode_attention)
        hidden = self.model(torch.tensor(input_ids, device=dev), ctx.positions, ctx)
        if len(rows) < len(input_ids):
            hidden = hidden[torch.tensor(rows, device=dev)]
        logits = self.model.logits(hidden).cpu()
        return list(torch.split(logits, row_counts))

    @torch.inference_mode()
    def probe(self) -> None:
        """A real one-token forward that touches no cache state (readiness)."""
        ids = torch.zeros(1, dtype=torch.long, device=self.device)
        hidden = self.model(ids, ids, DenseContext([0, 1], causal=True))
        if not torch.isfinite(self.model.logits(hidden)).all():
            raise RuntimeError("probe forward produced non-finite logits")

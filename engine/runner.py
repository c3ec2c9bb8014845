"""ModelRunner: turns a scheduled Batch into tensors, runs one forward over the paged cache, returns logit rows.

A batch mixes every kind of forward: its rows are flattened into one ragged token axis (no padding), so the
linear layers read the weights once for all of them; each sequence's mask (causal or bidirectional) and the
draft-LoRA rows travel in the `PagedContext`.

Owns the weights, the KV pool's memory and the device; which page belongs to whom is the scheduler's
(`BlockManager`), and each forward brings its sequences' block tables in the Batch. Sizing (`num_kv_blocks`): on
CUDA the pool takes `gpu_memory_utilization` of the device memory minus weights and an activation reserve; on CPU
it holds `num_kv_tokens` tokens.

Tensor parallelism (`tensor_parallel_size` > 1, engine/parallel/): the engine's runner is rank 0. It starts the
other ranks (`Peers`), each a ModelRunner over its shard of the weights and of the KV heads, with a pool of the
same page ids; every forward it turns the Batch into a `ForwardPlan` (token ids, lengths, masks, block tables,
draft-LoRA rows: what every rank needs, nothing the decoders need), sends it to the other ranks and runs it
itself. Rank 0 alone holds the LM head, so only it computes logits; the other ranks return nothing. Any failure
in a tensor-parallel forward is a `TensorParallelError`: the ranks may be out of step, so the engine stops.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.attention import DenseContext, KVCache, PagedContext, flash_available
from engine.batch import Batch
from engine.config import EngineConfig
from engine.cpu_kernels import FUSED_DTYPES, TORCH_OPS, FusedCpuOps, TorchOps, load_cpu_ops
from engine.cpu_linear import prepare_cpu_linears
from engine.loader import load_model
from engine.model_config import ModelConfig
from engine.parallel.group import TensorParallelGroup
from engine.parallel.shard import TensorShard, check_tensor_parallel_size

log = logging.getLogger("trimode.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str, rank: int = 0, world: int = 1) -> torch.device:
    """The device of tensor-parallel rank `rank`: the CPU, or the `rank`-th CUDA device from the configured one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    first = device.index or 0
    if first + world > torch.cuda.device_count():
        raise ValueError(f"engine config: tensor_parallel_size={world} needs CUDA devices {first}.."
                         f"{first + world - 1}, only {torch.cuda.device_count()} are visible")
    return torch.device("cuda", first + rank) if world > 1 or device.index is not None else device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass(frozen=True, slots=True)
class ForwardPlan:
    """One forward as every rank runs it: the flat query tokens and, per sequence, its query and context lengths,
    mask and KV pages; the first `lora_rows` rows get the draft adapter. Plain lists: cheap to send to the ranks."""

    input_ids: list[int]
    q_lens: list[int]
    k_lens: list[int]  # context length including this forward's query tokens
    causal: list[bool]
    block_tables: list[list[int]]
    lora_rows: int


PROBE = "probe"  # what rank 0 sends the other ranks for a readiness probe forward (no cache state touched)


class ModelRunner:
    """The forward of one rank. The engine's runner is built without `group`: with `tensor_parallel_size` > 1 it
    starts the other ranks and becomes rank 0; a worker (engine/parallel/worker.py) passes its rank's group."""

    def __init__(self, config: EngineConfig, model_path: str, group: TensorParallelGroup | None = None) -> None:
        world = config.tensor_parallel_size
        self.peers = None
        if world > 1 and group is None:
            from engine.parallel.peers import Peers

            # a size that does not divide the heads is a config error before any process starts
            check_tensor_parallel_size(ModelConfig.from_file(Path(model_path) / "config.json"), world)
            self.peers = Peers(config, model_path, pick_device(config.device, 0, world))
            group = self.peers.group
        self.group = group
        try:
            self._load(config, model_path)
        except BaseException as exc:
            if self.peers is not None:  # a rank that failed to load says why; the others are stopped
                raise self.peers.failure(exc, loading=True) from exc
            raise

    def _load(self, config: EngineConfig, model_path: str) -> None:
        group = self.group
        rank, world = (0, 1) if group is None else (group.rank, group.world)
        self.device = pick_device(config.device, rank, world) if group is None else group.device
        threads = config.num_threads
        if world > 1 and hasattr(os, "sched_getaffinity"):  # the ranks share the CPUs the engine was given
            share = max(1, len(os.sched_getaffinity(0)) // world)
            threads = share if threads is None else min(threads, share)
        if self.device.type == "cpu" and threads is not None:
            torch.set_num_threads(threads)  # process-wide: the engine owns the process's compute
        self.dtype = pick_dtype(config.dtype, self.device)
        shard = None if group is None else TensorShard(rank, world)
        self.model, self.info = load_model(model_path, self.dtype, self.device, shard=shard)
        if group is not None:
            self.model.set_reduce(group.all_reduce)
        self.model.fuse_projections()
        self.linear_kernel = "cuda"
        self.ops: TorchOps | FusedCpuOps = TORCH_OPS
        if self.device.type == "cpu":
            self.linear_kernel = prepare_cpu_linears(self.model, self.model.diffusion_head, self.dtype)
            self.ops = self._cpu_ops(config.cpu_kernels)
            self.model.set_ops(self.ops)
        cfg = self.model.cfg  # this rank's geometry: its share of the KV heads
        self.block_size = config.kv_block_size
        num_blocks = self._num_kv_blocks(config)
        if group is not None:  # the same page ids on every rank: the pool every rank has room for
            num_blocks = group.min_int(num_blocks)
        self.num_kv_blocks = num_blocks
        self.cache = KVCache.allocate(cfg.num_hidden_layers, num_blocks, self.block_size, cfg.num_key_value_heads,
                                      cfg.head_dim, self.dtype, self.device)
        self.use_flash = config.use_flash_attn and flash_available(self.device, self.block_size)
        attention = "flash-attn" if self.use_flash else "sdpa"
        if self.ops.decode_attention is not None:
            attention += " (one-token rows: paged kernel)"
        tp = "" if group is None else f", tensor-parallel rank {rank} of {world}: {cfg.num_key_value_heads} KV heads"
        log.info("KV cache: %d blocks x %d tokens = %d tokens (%s, %s, attention=%s, linear=%s, ops=%s%s)",
                 num_blocks, self.block_size, num_blocks * self.block_size, self.device, self.dtype, attention,
                 self.linear_kernel, self.ops.name, tp)

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
        cfg = self.model.cfg  # this rank's share of the KV heads
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
        plan = ForwardPlan(input_ids, q_lens, k_lens, causal, batch.block_tables, lora_rows)
        hidden = self._on_every_rank(plan)
        if len(rows) < len(input_ids):
            hidden = hidden[torch.tensor(rows, device=self.device)]
        logits = self.model.logits(hidden).cpu()
        return list(torch.split(logits, row_counts))

    def execute(self, plan: ForwardPlan | str) -> torch.Tensor:
        """This rank's part of a forward (a plan, or `PROBE`): the final hidden states [T, H]."""
        if plan == PROBE:
            ids = torch.zeros(1, dtype=torch.long, device=self.device)
            return self.model(ids, ids, DenseContext([0, 1], causal=True))
        assert isinstance(plan, ForwardPlan)
        n = len(plan.input_ids)
        lora: bool | slice = False if plan.lora_rows == 0 else True if plan.lora_rows == n else slice(0, plan.lora_rows)
        ctx = PagedContext(self.cache, plan.q_lens, plan.k_lens, plan.causal, plan.block_tables, draft_lora=lora,
                           use_flash=self.use_flash, decode_kernel=self.ops.decode_attention)
        return self.model(torch.tensor(plan.input_ids, device=self.device), ctx.positions, ctx)

    def _on_every_rank(self, plan: ForwardPlan | str) -> torch.Tensor:
        """Run `plan` here and, under tensor parallelism, on every other rank (rank 0 sends it first)."""
        if self.peers is None:
            return self.execute(plan)
        try:
            self.peers.send(plan)
            return self.execute(plan)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the ranks are out of step now
            raise self.peers.failure(exc) from exc

    @torch.inference_mode()
    def probe(self) -> None:
        """A real one-token forward that touches no cache state (readiness), on every rank."""
        hidden = self._on_every_rank(PROBE)
        if not torch.isfinite(self.model.logits(hidden)).all():
            raise RuntimeError("probe forward produced non-finite logits")

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do without them); the runner serves no forward after."""
        if self.peers is not None:
            self.peers.close()

"""EngineConfig: every engine knob, with its default and a comment; unknown keys are errors.

Loaded from the `[engine]` table of a TOML preset in `configs/` and overridden by command-line flags. Derived
values (the number of KV blocks) are computed by the runner and logged, never written back here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from engine.decoding.modes import MODES  # the one list of modes; re-exported here for the loadtest and the tests


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # checkpoint directory; None = the built-in trimode-tiny
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    seed: int = 0  # engine-wide RNG seed for unseeded sampling
    kv_block_size: int = 16  # tokens per KV page
    enable_prefix_caching: bool = True  # reuse the KV of full blocks of earlier requests' prefixes (every mode)
    num_kv_tokens: int = 65536  # CPU: KV pool size in tokens
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of GPU memory for weights + KV + activations
    max_model_len: int | None = None  # context limit; None = min(max_position_embeddings, KV pool)
    max_num_seqs: int = 64  # running sequences at most
    max_num_batched_tokens: int = 2048  # query tokens per forward at most (prefill is chunked to fit)
    default_mode: str = "ar"  # mode when a request names none (tri-mode checkpoints only; plain LMs: ar)
    default_block_length: int | None = None  # None = the checkpoint's block_size
    allowed_block_lengths: tuple[int, ...] = (4, 8, 16, 32, 64)  # block_length values a request may ask for
    default_threshold: float = 0.9  # diffusion confidence threshold when a request gives none
    draft_lora: bool = True  # self_spec drafts use linear_spec_lora/ when the checkpoint ships it
    diffusion_lora: bool | None = None  # denoise forwards also use the draft LoRA; None = the checkpoint's hint
    # under tensor parallelism per rank, and at most the rank's share of the CPUs the engine may run on
    num_threads: int | None = None  # CPU: torch intra-op threads; None = torch's default (all cores)
    use_flash_attn: bool = True  # CUDA + flash-attn installed + kv_block_size % 256 == 0; else SDPA
    # CPU fp32 / bf16: "auto" runs norms, RoPE, SwiGLU and decode attention as C++ kernels built on first start
    # (g++ and ninja; eager torch ops, with a warning, when they cannot be built), "fused" requires them, "torch"
    # never builds them (engine/cpu_kernels.py)
    cpu_kernels: str = "auto"
    # checked at admission from the worst case of the mode and knobs (a 400 names the knob); the default admits
    # every ar, diffusion and one-shot self_spec request that fits the context (each needs fewer than
    # 2 x max_model_len) and refuses only self_spec threshold drafting with a long block and a long output
    max_forwards_per_request: int | None = None  # decode forwards a request may need at most; None = 2 x max_model_len
    # ranks one model is split over (Megatron tensor parallelism, engine/parallel/): must divide the checkpoint's
    # KV heads, attention heads and intermediate size; CUDA: one device per rank (NCCL), CPU: processes (gloo)
    tensor_parallel_size: int = 1  # ranks the model is sharded over (engine process + size-1 workers)
    tensor_parallel_timeout: float = 300.0  # seconds a rank waits in one collective before the engine fails

    def __post_init__(self) -> None:
        checks = {
            "dtype": self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "device": self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "kv_block_size": self.kv_block_size >= 1,
            "enable_prefix_caching": isinstance(self.enable_prefix_caching, bool),
            "num_kv_tokens": self.num_kv_tokens >= self.kv_block_size,
            "gpu_memory_utilization": 0 < self.gpu_memory_utilization <= 1,
            "max_model_len": self.max_model_len is None or self.max_model_len >= 1,
            "max_num_seqs": self.max_num_seqs >= 1,
            "max_num_batched_tokens": self.max_num_batched_tokens >= 1,
            "default_mode": self.default_mode in MODES,
            "allowed_block_lengths": len(self.allowed_block_lengths) > 0
            and all(b >= 2 for b in self.allowed_block_lengths),
            "default_threshold": 0 < self.default_threshold <= 1,
            "num_threads": self.num_threads is None or self.num_threads >= 1,
            "cpu_kernels": self.cpu_kernels in ("auto", "fused", "torch"),
            "max_forwards_per_request": self.max_forwards_per_request is None or self.max_forwards_per_request >= 1,
            "tensor_parallel_size": isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
            "tensor_parallel_timeout": self.tensor_parallel_timeout > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"engine config: invalid {name}={getattr(self, name)!r}")
        object.__setattr__(self, "allowed_block_lengths", tuple(self.allowed_block_lengths))

    @classmethod
    def from_dict(cls, raw: dict) -> EngineConfig:
        """Build from a TOML table; unknown keys raise ValueError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"engine config: unknown key(s) {', '.join(unknown)}")
        return cls(**raw)

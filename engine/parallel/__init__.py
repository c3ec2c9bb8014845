"""Tensor parallelism: one model spread over `tensor_parallel_size` processes (ranks), Megatron-style.

- `shard.py`: which slice of each weight a rank holds (q/k/v and gate/up by output rows, o_proj, its draft LoRA
  and down by input columns; embeddings replicated, the LM head on rank 0 only) and the rank's model geometry.
- `group.py`: the ranks' process group (gloo on CPU, NCCL on CUDA) and its one collective in a forward, the sum
  after each row-parallel layer; `TensorParallelError`, which no forward survives.
- `peers.py`: rank 0's side: it spawns the other ranks, sends each of them every forward's plan, watches them.
- `worker.py`: a rank > 0: loads its shard, then runs the forwards rank 0 sends until told to stop.

The scheduler, the decoders and the sampling run once, in rank 0 (the engine's process); the other ranks only
run forwards, in the same order, over their own KV pages (their share of the KV heads, same page ids).
"""

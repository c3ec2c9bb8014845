"""The ranks' process group and the collectives a tensor-parallel forward needs.

The group is built straight from a `TCPStore` hosted by rank 0 (`ProcessGroupGloo` on CPU, `ProcessGroupNCCL` on
CUDA), never through `torch.distributed.init_process_group`: no process-wide default group, so one process can
host several engines (the tests do) and a respawned engine starts from nothing. Every collective waits at most
`timeout` seconds: a rank that never arrives fails the forward instead of hanging it, and gloo fails at once when
a peer's process is gone (its sockets close).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


class TensorParallelError(RuntimeError):
    """A rank died, or a tensor-parallel forward failed: the ranks are out of step and the engine cannot go on
    (never a single batch's failure: no forward runs after it)."""


def make_store(host: str, port: int, world: int, is_master: bool, timeout: float) -> dist.TCPStore:
    """Rank 0 hosts the store (`port` 0: any free port, read back from `.port`); the others connect to it."""
    return dist.TCPStore(host, port, world, is_master=is_master, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout))


class TensorParallelGroup:
    """This rank's membership of the group: `all_reduce` (the sum after a row-parallel layer) and `min_int`."""

    def __init__(self, store: dist.Store, rank: int, world: int, device: torch.device, timeout: float) -> None:
        self.rank, self.world, self.device = rank, world, device
        delta = datetime.timedelta(seconds=timeout)
        if device.type == "cuda":  # untested here (no GPU): one NCCL communicator over the ranks' devices
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = delta
            self.pg: dist.ProcessGroup = dist.ProcessGroupNCCL(store, rank, world, opts)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, world, delta)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place (every rank ends with the same bits); returns it."""
        self.pg.allreduce([t]).wait()
        return t

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` (the KV pool every rank has room for)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.pg.allreduce([t], opts).wait()
        return int(t.item())

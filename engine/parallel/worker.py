"""A tensor-parallel worker: rank r > 0 of an engine. `python -m engine.parallel.worker CMD_FD ERR_FD`.

It reads its `WorkerSpec` from the command pipe, joins the group, loads its shard (a `ModelRunner` over its share
of the weights and KV heads), then runs each forward rank 0 sends, in order, until None or until the pipe closes
(rank 0 is gone). Anything that fails is reported up the error pipe, and the worker exits non-zero: rank 0 then
fails the engine (engine/parallel/peers.py). It never computes logits: rank 0 holds the LM head.
"""

from __future__ import annotations

import logging
import pickle
import signal
import sys
from multiprocessing.connection import Connection

log = logging.getLogger("trimode.engine")


def main(argv: list[str]) -> int:
    commands = Connection(int(argv[0]), writable=False)
    errors = Connection(int(argv[1]), readable=False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server handles Ctrl-C; rank 0 stops this process

    def report(exc: BaseException) -> int:
        try:
            errors.send((type(exc).__name__, str(exc)))
        except OSError:
            pass
        return 1

    try:
        spec = commands.recv()
    except (EOFError, OSError):
        return 0
    logging.basicConfig(level=spec.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s [tp rank {spec.rank}] %(message)s")
    try:
        import torch

        from engine.parallel.group import TensorParallelGroup, make_store
        from engine.parallel.peers import STORE_HOST
        from engine.runner import ModelRunner, pick_device

        cfg = spec.config
        device = pick_device(cfg.device, spec.rank, spec.world)
        if device.type == "cuda":  # untested here (no GPU): NCCL needs the rank's device current
            torch.cuda.set_device(device)
        store = make_store(STORE_HOST, spec.store_port, spec.world, False, cfg.tensor_parallel_timeout)
        group = TensorParallelGroup(store, spec.rank, spec.world, device, cfg.tensor_parallel_timeout)
        runner = ModelRunner(cfg, spec.model_path, group)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which raises it
        log.error("could not start: %s: %s", type(exc).__name__, exc)
        return report(exc)
    with torch.inference_mode():
        while True:
            try:
                plan = pickle.loads(commands.recv_bytes())
            except (EOFError, OSError):
                return 0  # rank 0 is gone
            if plan is None:
                return 0
            try:
                runner.execute(plan)
            except Exception as exc:  # noqa: BLE001 - a broken collective (rank 0 or a peer died) or a bug
                log.error("forward failed: %s: %s", type(exc).__name__, exc)
                return report(exc)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

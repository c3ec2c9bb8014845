"""`trimode serve` (and `python -m server serve`): the server's one command; the other `trimode` subcommands are
tools beside the runtime, dispatched by `trimode_cli`. Imports no torch and no tool (bench, loadtest).

`serve` loads a preset (`--config`), applies the named flags and any generic `--engine.KEY VALUE` /
`--server.KEY VALUE` overrides (every field of EngineConfig / ServerConfig, listed in `--help` with its default
and meaning), loads the engine and runs uvicorn. SIGTERM/SIGINT drains: readiness and new requests answer 503,
in-flight requests get up to `shutdown_timeout` seconds, then the process exits 0. A second signal exits at once.
An engine that dies and cannot be respawned (`engine_restart_attempts` used in a row) makes the process exit 1.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
import sys
from dataclasses import MISSING, fields
from typing import Any

from engine.config import EngineConfig
from server.affinity import CpuPlan, pin_current_process, plan_cpus, usable_cpus
from server.config import ServerConfig, load_config, parse_value

log = logging.getLogger("trimode.server")

NAMED = {  # flag -> (table, key)
    "model": ("engine", "model"), "host": ("server", "host"), "port": ("server", "port"),
    "api_key": ("server", "api_key"), "api_key_file": ("server", "api_key_file"), "log_level": ("server", "log_level"),
    "served_model_name": ("server", "served_model_name"), "shutdown_timeout": ("server", "shutdown_timeout"),
    "enable_prefix_caching": ("engine", "enable_prefix_caching"),
    "tensor_parallel_size": ("engine", "tensor_parallel_size"),
}


def _field_docs(cls: type) -> dict[str, str]:
    """The trailing comment of each dataclass field: the help text of its generic flag."""
    src = inspect.getsource(cls)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): [^\n#]*#\s*([^\n]*)$", src, re.M)}


def add_config_flags(parser: argparse.ArgumentParser, tables: tuple[str, ...] = ("engine", "server")) -> None:
    for table, cls in (("engine", EngineConfig), ("server", ServerConfig)):
        if table not in tables:
            continue
        group = parser.add_argument_group(f"[{table}] overrides (TOML values; 'none' for None)")
        docs = _field_docs(cls)
        for f in fields(cls):
            default = "<redacted>" if f.name == "api_key" else f.default if f.default is not MISSING else None
            group.add_argument(f"--{table}.{f.name}", dest=f"{table}.{f.name}", metavar="VALUE",
                               help=f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m server`: the `serve` subcommand alone."""
    parser = argparse.ArgumentParser(prog="trimode", description="Serve tri-mode diffusion LMs over an "
                                     "OpenAI-compatible API.")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def add_serve_parser(sub: Any) -> None:
    """`serve` and its flags, as a subcommand of `sub` (an argparse subparsers action)."""
    serve = sub.add_parser("serve", help="run the HTTP server", description="Serve a checkpoint over the "
                           "OpenAI API. Precedence: built-in defaults < --config TOML < flags.")
    serve.add_argument("--config", help="TOML preset with [engine] and [server] tables (see configs/)")
    serve.add_argument("--model", help="checkpoint directory (default: the built-in trimode-tiny)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 8000)")
    serve.add_argument("--api-key", default=os.environ.get("TRIMODE_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' on all but /health /ready /metrics /load /version; "
                       "prefer env TRIMODE_API_KEY or --api-key-file: a flag's value shows in `ps`")
    serve.add_argument("--api-key-file", metavar="PATH",
                       help="read the API key from this file (its one line; e.g. a mounted Docker/Kubernetes secret)")
    serve.add_argument("--served-model-name", help="model name in the API (default: checkpoint directory name)")
    serve.add_argument("--tensor-parallel-size", type=int, metavar="N",
                       help="shard the model over N ranks (Megatron tensor parallelism: the engine process plus N-1 "
                       "workers; NCCL on CUDA, one GPU each, gloo on CPU); N must divide the checkpoint's KV heads, "
                       "attention heads and intermediate size (default 1)")
    serve.add_argument("--shutdown-timeout", type=float, help="seconds to drain in-flight requests on SIGTERM")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                       help="reuse the KV blocks of earlier requests' prefixes (default on; as vLLM's flag)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"],
                       help="log level; one line per finished request at info (default info)")
    add_config_flags(serve)


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Named flags and generic --table.key flags -> {"engine": {...}, "server": {...}} (typed values)."""
    out: dict[str, dict[str, Any]] = {"engine": {}, "server": {}}
    for dest, value in vars(args).items():
        if value is None:
            continue
        if dest in NAMED:
            table, key = NAMED[dest]
            out[table][key] = value
        elif "." in dest:
            table, key = dest.split(".", 1)
            cls = EngineConfig if table == "engine" else ServerConfig
            out[table][key] = parse_value(cls, key, value)
    return out


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def engine_on_cpu(engine_cfg: EngineConfig) -> bool:
    """Whether the engine will run on the CPU (device "cpu", or "auto" without CUDA), as the runner decides."""
    if engine_cfg.device != "auto":
        return engine_cfg.device == "cpu"
    import torch

    return not torch.cuda.is_available()


def cpu_plan(engine_cfg: EngineConfig, server_cfg: ServerConfig) -> CpuPlan | None:
    """Where the engine and HTTP processes run, or None for the OS to decide; ValueError names the field."""
    if not server_cfg.engine_process:
        return None
    threads = engine_cfg.num_threads  # per rank: the engine's ranks share the engine's CPUs
    if threads is not None:
        threads *= engine_cfg.tensor_parallel_size
    return plan_cpus(server_cfg.engine_cpus, engine_on_cpu(engine_cfg), threads, usable_cpus())


def check_tensor_parallel(engine_cfg: EngineConfig) -> None:
    """ValueError naming `tensor_parallel_size` when the checkpoint's heads cannot be shared by that many ranks:
    a config error before any process starts."""
    if engine_cfg.tensor_parallel_size == 1:
        return
    from pathlib import Path

    from engine.engine import default_model_path
    from engine.model_config import ModelConfig
    from engine.parallel.shard import check_tensor_parallel_size

    path = Path(engine_cfg.model or default_model_path()) / "config.json"
    check_tensor_parallel_size(ModelConfig.from_file(path), engine_cfg.tensor_parallel_size)


def load_engine(engine_cfg: EngineConfig, server_cfg: ServerConfig, plan: CpuPlan | None = None) -> Any:
    """The engine as the server will run it: its own process (default) or an in-process Engine (a thread).

    With a `cpu_plan`, this (the HTTP) process moves to its CPUs before the engine process is spawned on its own.
    """
    if server_cfg.engine_process:
        from server.engine_process import EngineProcess

        if plan is not None:
            if plan.api:
                pin_current_process(plan.api)
            log.info("CPU placement: %s", plan.describe())
        else:
            log.info("CPU placement: left to the OS (engine_cpus=%s)", server_cfg.engine_cpus)
        return EngineProcess(engine_cfg, server_cfg.log_level, cpus=plan.engine if plan else None)
    from engine.engine import Engine

    return Engine(engine_cfg)


def serve(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.drain import make_server
    from server.middleware import OPEN_PATHS

    try:
        engine_cfg, server_cfg = load_config(args.config, overrides_from(args))
        check_tensor_parallel(engine_cfg)
        plan = cpu_plan(engine_cfg, server_cfg)
    except (OSError, ValueError) as exc:
        print(f"trimode: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(server_cfg.log_level)
    try:
        engine = load_engine(engine_cfg, server_cfg, plan)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"trimode: cannot load the model: {exc}", file=sys.stderr)
        return 2
    app = create_app(engine, server_cfg)
    async_engine = app.state.async_engine
    log.info("serving %s (max_model_len %d) on http://%s:%d; API key %s; %s", async_engine.metrics.model_name,
             async_engine.max_model_len, server_cfg.host, server_cfg.port,
             "required except on " + " ".join(sorted(OPEN_PATHS)) if server_cfg.api_key else "off", server_cfg)
    server = make_server(app, server_cfg, async_engine)
    async_engine.on_engine_lost = lambda: setattr(server, "should_exit", True)  # no respawn left: exit for a supervisor
    server.run()
    return 1 if async_engine.engine_lost else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m server serve ...`; the `trimode` command (`trimode_cli`) dispatches `serve` here."""
    return serve(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

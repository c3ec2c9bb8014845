"""ServerConfig and the one loader for both config layers: TOML preset, then command-line overrides.

A preset has an `[engine]` table (fields of `engine.config.EngineConfig`) and a `[server]` table (fields of
`ServerConfig`). Unknown tables or keys are errors, as are unknown override keys. Overrides arrive as strings
(`--engine.max_num_seqs 8`) and are parsed as TOML values, so numbers, booleans and lists work; a field typed as a
string keeps the raw text.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from server.affinity import parse_cpu_list
from server.api_key import resolve_api_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # bind address
    port: int = 8000  # TCP port
    api_key: str | None = field(default=None, repr=False)  # Bearer key on all routes but probes/metrics; None=open
    api_key_file: str | None = None  # file holding the key, read at startup (off `ps`); sets api_key, which must agree
    served_model_name: str | None = None  # name in /v1/models and responses; None = the checkpoint directory name
    max_queued_requests: int = 256  # sequences admitted (waiting + running; n counts n); beyond -> 503
    max_queued_tokens: int = 1 << 20  # prompt + max_tokens summed over admitted sequences; beyond -> 503
    # admitted sequences' peak KV pages (prompt + max_tokens, diffusion in whole blocks) summed, as a multiple of the
    # engine's KV pool; beyond -> 503, one request alone beyond -> 400. At 1.0 admitted work never preempts.
    max_queued_kv_factor: float = 1.0  # admitted requests' worst-case KV / the KV pool; beyond -> 503 (Retry-After)
    max_body_bytes: int = 1 << 22  # request body limit; beyond -> 413
    max_n: int = 16  # largest `n`
    max_prompts: int = 64  # longest prompt list in one completions request
    max_stop_strings: int = 16  # most stop strings per request
    max_stop_string_len: int = 256  # longest stop string (characters)
    request_timeout: float | None = None  # default per-request deadline in seconds; then finish_reason "abort"
    queue_timeout: float | None = None  # no first token within this many seconds -> 503 before any stream starts
    probe_timeout: float = 30.0  # /ready: seconds to wait for the one-token probe forward
    ready_cache_seconds: float = 5.0  # /ready: a step or probe this recent answers 200 without a new probe forward
    stall_timeout: float | None = 60.0  # /health 503 when the engine sends nothing this long with work in flight
    engine_restart_attempts: int = 3  # respawns in a row of a dead engine process; then the server exits 1
    engine_restart_backoff: float = 1.0  # seconds before the first respawn; doubles with each further attempt
    shutdown_timeout: float = 30.0  # SIGTERM: seconds in-flight requests may take before they are aborted
    header_timeout: float = 10.0  # seconds to send complete request headers (from connect / previous response)
    body_timeout: float = 30.0  # seconds to send the whole request body after its headers; then 408, closed
    write_timeout: float = 60.0  # seconds a response may wait on a client that reads nothing; then dropped
    max_connections: int = 2048  # open HTTP connections (kept below the open-files limit); beyond -> 503, closed
    retry_after: int = 1  # seconds, the Retry-After header on 503
    log_level: str = "info"  # debug | info | warning | error | critical
    engine_process: bool = True  # run the engine in its own process (no GIL shared with HTTP); false = a thread
    engine_cpus: str | None = "auto"  # engine's CPUs: auto (CPU engine: own cores, HTTP the rest) | "1-3,6" | "none"
    tool_call_parser: str = "hermes"  # how tool calls are found in output (server.tool_parsers.PARSERS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_key", resolve_api_key(self.api_key, self.api_key_file))  # ValueError names it
        checks = {
            "port": 0 <= self.port <= 65535,
            "max_queued_requests": self.max_queued_requests >= 1,
            "max_queued_tokens": self.max_queued_tokens >= 1,
            "max_queued_kv_factor": 0 < self.max_queued_kv_factor < float("inf"),
            "ready_cache_seconds": self.ready_cache_seconds >= 0,
            "stall_timeout": self.stall_timeout is None or self.stall_timeout > 0,
            "engine_restart_attempts": self.engine_restart_attempts >= 0,
            "engine_restart_backoff": 0 <= self.engine_restart_backoff < float("inf"),
            "max_body_bytes": self.max_body_bytes >= 1024,
            "max_n": self.max_n >= 1,
            "max_prompts": self.max_prompts >= 1,
            "max_stop_strings": self.max_stop_strings >= 0,
            "max_stop_string_len": self.max_stop_string_len >= 1,
            "request_timeout": self.request_timeout is None or self.request_timeout > 0,
            "queue_timeout": self.queue_timeout is None or self.queue_timeout > 0,
            "probe_timeout": self.probe_timeout > 0,
            "shutdown_timeout": self.shutdown_timeout >= 0,
            "header_timeout": self.header_timeout > 0,
            "body_timeout": self.body_timeout > 0,
            "write_timeout": self.write_timeout > 0,
            "max_connections": self.max_connections >= 1,
            "retry_after": self.retry_after >= 0,
            "log_level": self.log_level in LOG_LEVELS,
            "tool_call_parser": self.tool_call_parser in _tool_parsers(),
        }
        if self.engine_cpus not in (None, "auto", "none"):
            parse_cpu_list(self.engine_cpus)  # ValueError naming engine_cpus
            if not self.engine_process:
                raise ValueError(f"server config: engine_cpus={self.engine_cpus!r} needs engine_process = true")
        for name, ok in checks.items():
            if not ok:
                shown = "<redacted>" if name == "api_key" else repr(getattr(self, name))
                raise ValueError(f"server config: invalid {name}={shown}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ServerConfig:
        """Build from a TOML table; unknown keys raise ValueError naming them."""
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"server config: unknown key(s) {', '.join(unknown)}")
        return cls(**raw)


def _tool_parsers() -> tuple[str, ...]:
    from server.tool_parsers import PARSERS

    return tuple(PARSERS)


TABLES: dict[str, type] = {"engine": EngineConfig, "server": ServerConfig}


def parse_value(cls: type, key: str, text: str) -> Any:
    """A command-line override value: a TOML literal, `none`/`null` for None, raw text for string fields."""
    types = {f.name: str(f.type) for f in fields(cls)}
    if key not in types:
        raise ValueError(f"unknown config key '{key}' for [{cls.__name__}]")
    if text.lower() in ("none", "null"):
        return None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if types[key].startswith("str") and not isinstance(value, str):
        return text
    return value


def load_config(path: str | Path | None = None,
                overrides: dict[str, dict[str, Any]] | None = None) -> tuple[EngineConfig, ServerConfig]:
    """Read a TOML preset (optional) and apply overrides {"engine": {...}, "server": {...}} on top."""
    tables: dict[str, dict[str, Any]] = {"engine": {}, "server": {}}
    if path is not None:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        unknown = sorted(set(raw) - set(TABLES))
        if unknown:
            raise ValueError(f"{path}: unknown table(s) {', '.join(unknown)}; expected [engine] and [server]")
        for name, table in raw.items():
            if not isinstance(table, dict):
                raise ValueError(f"{path}: '{name}' must be a table")
            tables[name].update(table)
    for name, table in (overrides or {}).items():
        if name not in TABLES:
            raise ValueError(f"unknown config table '{name}'")
        tables[name].update(table)
    return EngineConfig.from_dict(tables["engine"]), ServerConfig.from_dict(tables["server"])

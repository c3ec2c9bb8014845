#!/usr/bin/env python3
"""Container HEALTHCHECK: exit 0 when trimode's `/health` answers 200, else 1.

The URL is TRIMODE_HEALTH_URL when set; otherwise http://127.0.0.1:PORT/health with PORT taken from the running
`trimode serve` command line (`--port N` or `--port=N`, found in /proc), then TRIMODE_PORT, then 8000. So the
check follows `docker run trimode:cpu --host 0.0.0.0 --port 9000` without further configuration. Standard
library only; no curl in the image.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path


def port_from_argv(argv: list[str]) -> int | None:
    """The value of the last --port flag of a `... serve ...` command line, or None."""
    if "serve" not in argv:
        return None
    port = None
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            port = argv[i + 1]
        elif arg.startswith("--port="):
            port = arg.split("=", 1)[1]
    try:
        return int(port) if port is not None else None
    except ValueError:
        return None


def server_port(proc: Path = Path("/proc")) -> int:
    """The port of the `trimode serve` process: PID 1 first (exec'd entrypoint), then any other process."""
    pids = sorted((int(p.name) for p in proc.glob("[0-9]*") if p.name.isdigit()), key=lambda pid: (pid != 1, pid))
    for pid in pids:
        try:
            argv = (proc / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        port = port_from_argv(argv)
        if port is not None:
            return port
    return int(os.environ.get("TRIMODE_PORT", "8000"))


def health_url() -> str:
    return os.environ.get("TRIMODE_HEALTH_URL") or f"http://127.0.0.1:{server_port()}/health"


def main() -> int:
    url = health_url()
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("TRIMODE_HEALTH_TIMEOUT", "4"))) as resp:
            ok = resp.status == 200
    except Exception as exc:  # connection refused, timeout, HTTP 503 (engine dead) ...
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: {url}: HTTP {resp.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

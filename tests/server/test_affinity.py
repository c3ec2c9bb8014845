"""`[server] engine_cpus`: where the engine and HTTP processes run (`server.affinity`), from the plan to the real
processes of `python -m server serve`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.affinity import CpuPlan, parse_cpu_list, plan_cpus
from server.config import ServerConfig, load_config
from tests.server_fixtures import free_port, wait_until_healthy

ROOT = Path(__file__).parents[2]
CAN_PIN = hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2


def test_cpu_lists_parse_and_bad_ones_name_the_field() -> None:
    assert parse_cpu_list("3") == (3,)
    assert parse_cpu_list("0-2,5, 7-8") == (0, 1, 2, 5, 7, 8)
    assert parse_cpu_list("2,1,2") == (1, 2)
    for bad in ("", "a", "1-", "-1", "1-2-3", "1,,2", "3-1", "1.5"):
        with pytest.raises(ValueError, match="engine_cpus"):
            parse_cpu_list(bad)


def test_auto_gives_the_engine_its_own_cores_and_http_the_rest() -> None:
    four = (0, 1, 2, 3)
    assert plan_cpus("auto", True, None, four) == CpuPlan((1, 2, 3), (0,))
    assert plan_cpus("auto", True, 1, four) == CpuPlan((3,), (0, 1, 2))
    assert plan_cpus("auto", True, 1, (0, 1)) == CpuPlan((1,), (0,))
    assert plan_cpus("auto", True, 2, (4, 9)) is None  # would leave HTTP nothing: not pinned
    assert plan_cpus("auto", True, None, (0,)) is None  # one CPU
    assert plan_cpus("auto", False, None, four) is None  # a CUDA engine
    assert plan_cpus("auto", True, None, None) is None  # the OS cannot pin
    assert plan_cpus(None, True, None, four) is None
    assert plan_cpus("none", True, None, four) is None  # TOML has no null


def test_explicit_cpus_are_checked_against_the_usable_ones() -> None:
    assert plan_cpus("2-3", True, None, (0, 1, 2, 3)) == CpuPlan((2, 3), (0, 1))
    assert plan_cpus("0-1", False, None, (0, 1)) == CpuPlan((0, 1), ())  # every CPU: HTTP stays unpinned
    with pytest.raises(ValueError, match="engine_cpus='7'.*outside"):
        plan_cpus("7", True, None, (0, 1))
    with pytest.raises(ValueError, match="cannot pin"):
        plan_cpus("0", True, None, None)


def test_config_validates_engine_cpus() -> None:
    assert ServerConfig().engine_cpus == "auto"
    _, cfg = load_config(None, {"server": {"engine_cpus": None}})
    assert cfg.engine_cpus is None
    assert ServerConfig(engine_cpus="none").engine_cpus == "none"
    with pytest.raises(ValueError, match="invalid engine_cpus='x'"):
        ServerConfig(engine_cpus="x")
    with pytest.raises(ValueError, match="engine_cpus='1' needs engine_process"):
        ServerConfig(engine_cpus="1", engine_process=False)


def test_serve_rejects_cpus_it_cannot_use() -> None:
    r = subprocess.run([sys.executable, "-m", "server", "serve", "--server.engine_cpus", "4096"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "engine_cpus='4096'" in r.stderr, r.stderr


@pytest.mark.skipif(not CAN_PIN, reason="needs Linux and at least two usable CPUs")
def test_serve_places_engine_and_http_processes(ckpt: Path) -> None:
    usable = tuple(sorted(os.sched_getaffinity(0)))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model", str(ckpt), "--port", str(port),
         "--engine.device", "cpu", "--engine.num_kv_tokens", "4096", "--engine.num_threads", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url)
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        engine = [p for p in children if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(engine) == 1, children
        assert os.sched_getaffinity(engine[0]) == {usable[-1]}  # auto, one engine thread: the last CPU
        assert os.sched_getaffinity(proc.pid) == set(usable[:-1])  # HTTP: the others
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "pinned", "max_tokens": 4, "mode": "self_spec"},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert "CPU placement: engine on CPUs" in out

"""Deployment checks that need no Docker: the Dockerfile, the entrypoint and healthcheck scripts, the compose stack
(Prometheus config, Grafana provisioning and dashboard), the metrics the dashboard queries against a live server's
/metrics, and the memory figures in docs/memory.md recomputed from the released checkpoints' geometry.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from engine.decoding.modes import MODES

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "trimode.json"


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

_DEFAULT_RE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose_default(value: str) -> str:
    """Interpolate compose `${VAR:-default}` with an empty environment (what `docker compose up` sees by default)."""
    return _DEFAULT_RE.sub(lambda m: m.group(2) or "", str(value))


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    out = []
    for panel in dashboard()["panels"]:
        out += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return out


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var["type"] == "query" and query:
            exprs.append(query)
    return exprs


def substitute_variables(expr: str) -> str:
    """Replace Grafana template variables with values a PromQL parser accepts."""
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


METRIC_RE = re.compile(r"(?<![\w:])(trimode:[A-Za-z_][A-Za-z0-9_:]*)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names (with their wire suffixes) that a PromQL expression selects."""
    return set(METRIC_RE.findall(expr))


def metric_family(name: str) -> str:
    """Family name of a wire name: strip a histogram's _bucket/_sum/_count suffix."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def promql_label_names(expr: str) -> set[str]:
    """Label names an expression matches on or aggregates by (selectors `{l="v"}`, `by (l, ...)`)."""
    labels: set[str] = set()
    for body in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    return labels


class Exposition:
    """The parts of a Prometheus text exposition the checks need: sample names, HELP/TYPE names, labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: set[str] = set()
        self.types: dict[str, str] = {}
        self.labels: dict[str, set[str]] = {}  # sample name -> label names seen on it
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(None, 3)
                self.types[name] = kind.strip()
            elif line.startswith("# HELP "):
                self.types.setdefault(line.split(None, 3)[2], "untyped")
            elif line and not line.startswith("#"):
                m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?", line)
                if m:
                    self.samples.add(m.group(1))
                    names = set(re.findall(r'(\w+)="', m.group(2) or ""))
                    self.labels.setdefault(m.group(1), set()).update(names)

    def family_of(self, name: str) -> str | None:
        """The HELP/TYPE family a wire name belongs to, or None."""
        for candidate in (name, metric_family(name), name.removesuffix("_total")):
            if candidate in self.types:
                return candidate
        return None

    def has(self, name: str) -> bool:
        """A sample with this name is exposed, or at least its family's HELP/TYPE line (series appear later)."""
        return name in self.samples or self.family_of(name) is not None

    def kind(self, name: str) -> str | None:
        family = self.family_of(name)
        return self.types.get(family) if family else None

    def label_names(self, name: str) -> set[str]:
        family = self.family_of(name) or name
        out: set[str] = set()
        for sample, names in self.labels.items():
            if sample == name or metric_family(sample) == family or sample.removesuffix("_total") == family:
                out |= names
        return out


def check_dashboard_against(expo: Exposition) -> list[str]:
    """Every problem with the dashboard's queries against one /metrics text (empty list: all good)."""
    problems = []
    for expr in dashboard_exprs():
        names = promql_metric_names(expr)
        if not names:
            problems.append(f"no trimode metric in {expr!r}")
        known_labels = {"le"}
        for name in sorted(names):
            if not expo.has(name):
                problems.append(f"{name} (family {metric_family(name)}) is not in /metrics; used in {expr!r}")
                continue
            kind = expo.kind(name)
            if name.endswith("_bucket") and kind != "histogram":
                problems.append(f"{name} is used as a histogram but /metrics says {kind}")
            if f"rate({name}" in expr and kind not in ("counter", "histogram"):
                problems.append(f"rate() over {name}, a {kind}")
            known_labels |= expo.label_names(name)
        unknown = promql_label_names(expr) - known_labels
        if unknown:
            problems.append(f"labels {sorted(unknown)} are on none of {sorted(names)}; used in {expr!r}")
    return problems


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, rest = buf.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


# ----------------------------------------------------------------------------------------------------------------
# the PromQL helpers themselves
# ----------------------------------------------------------------------------------------------------------------


def test_promql_helpers():
    expr = ('histogram_quantile(0.9, sum by (le, mode) (rate(trimode:time_to_first_token_seconds_bucket'
            '{model_name=~"$model_name"}[1m]))) / ignoring(mode) trimode:num_requests_running')
    assert promql_metric_names(expr) == {"trimode:time_to_first_token_seconds_bucket", "trimode:num_requests_running"}
    assert metric_family("trimode:batch_size_count") == "trimode:batch_size"
    assert metric_family("trimode:generation_tokens_total") == "trimode:generation_tokens_total"
    assert promql_label_names(expr) == {"le", "mode", "model_name"}
    expo = Exposition(
        "# HELP trimode:x_total X.\n# TYPE trimode:x_total counter\ntrimode:x_total{mode=\"ar\"} 1.0\n"
        "# HELP trimode:h H.\n# TYPE trimode:h histogram\n")
    assert expo.has("trimode:x_total") and expo.kind("trimode:x_total") == "counter"
    assert expo.has("trimode:h_bucket") and expo.kind("trimode:h_sum") == "histogram"  # TYPE line only: accepted
    assert not expo.has("trimode:y")
    assert expo.label_names("trimode:x_total") == {"mode"}


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile, .dockerignore, entrypoint, healthcheck
# ----------------------------------------------------------------------------------------------------------------


def test_dockerfile_runtime_contract():
    ins = dockerfile_instructions()
    kinds = [k for k, _ in ins]
    for needed in ("HEALTHCHECK", "USER", "VOLUME", "EXPOSE", "ENTRYPOINT", "CMD"):
        assert needed in kinds, f"Dockerfile lacks {needed}"
    final = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    tail = dict((k, v) for k, v in ins[final:])
    assert tail["FROM"].startswith("${VARIANT}"), "the last stage must be chosen by the VARIANT build argument"
    user = tail["USER"].split(":")[0]
    assert user not in ("root", "0"), "the image must run as a non-root user"
    assert "/models" in tail["VOLUME"]
    assert "8000" in tail["EXPOSE"].split()
    assert "healthcheck" in tail["HEALTHCHECK"] and "CMD" in tail["HEALTHCHECK"]
    assert json.loads(tail["ENTRYPOINT"]) == ["trimode-entrypoint"]
    assert json.loads(tail["CMD"]) == ["--host", "0.0.0.0", "--port", "8000"]


def test_dockerfile_variants():
    text = (ROOT / "Dockerfile").read_text()
    ins = dockerfile_instructions()
    stages = {v.split()[-1] for k, v in ins if k == "FROM" and " AS " in v.upper()}
    assert {"cpu-base", "cuda-base"} <= stages
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert "python:3.11-slim" in text
    assert 'TORCH_VERSION=2.13.0' in text and "https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"pip install .*\"\.\[gpu\]\"", text), "the CUDA image installs the gpu extra (flash-attn)"
    assert re.search(r"nvidia/cuda:\S+-runtime-", text)


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + "$")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(rx.match(c) for c in candidates):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_dockerfile_copies_exist_and_are_not_ignored():
    patterns = dockerignore_patterns()
    for kind, args in dockerfile_instructions():
        if kind != "COPY" or "--from=" in args:
            continue
        sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
        for src in sources:
            if "*" in src:
                continue  # optional glob (README.md*)
            assert (ROOT / src).exists(), f"COPY source {src} is missing"
            assert not dockerignored(src, patterns), f"COPY source {src} is excluded by .dockerignore"
            if (ROOT / src).is_dir():  # nothing the package needs inside a copied folder is excluded
                for f in (ROOT / src).rglob("*"):
                    rel = f.relative_to(ROOT).as_posix()
                    if f.is_file() and "__pycache__" not in rel and not rel.endswith(".pyc"):
                        assert not dockerignored(rel, patterns), f"{rel} is excluded by .dockerignore"


def test_dockerignore_rules():
    patterns = dockerignore_patterns()
    assert dockerignored(".git/config", patterns)
    assert dockerignored("tests/test_deploy.py", patterns)
    assert dockerignored("server/__pycache__/app.cpython-311.pyc", patterns)
    assert dockerignored("checkpoints/model.safetensors", patterns)  # stray weights stay out of the context
    assert not dockerignored("engine/builtin/trimode-tiny/model.safetensors", patterns)  # the built-in model ships
    assert not dockerignored("server/app.py", patterns)
    assert not dockerignored("docker/entrypoint.sh", patterns)


def _run_entrypoint(tmp_path: Path, args: list[str], env: dict[str, str]) -> dict:
    """Run docker/entrypoint.sh with a fake `trimode` on PATH that reports its argv and TRIMODE_API_KEY."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "trimode").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'key': os.environ.get('TRIMODE_API_KEY')}))\n")
    (fake / "trimode").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRIMODE_")}
    base["PATH"] = f"{fake}{os.pathsep}{base['PATH']}"
    proc = subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), *args], env={**base, **env},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_entrypoint_maps_environment_to_flags(tmp_path):
    subprocess.run(["bash", "-n", str(DOCKER / "entrypoint.sh")], check=True)
    out = _run_entrypoint(tmp_path, ["--host", "0.0.0.0", "--port", "8000"], {
        "TRIMODE_CONFIG": "/app/configs/nemotron-labs-diffusion-8b.toml",
        "TRIMODE_MODEL": "/models/Nemotron-Labs-Diffusion-8B",
        "TRIMODE_SERVED_MODEL_NAME": "nld-8b",
        "TRIMODE_LOG_LEVEL": "debug",
        "TRIMODE_SHUTDOWN_TIMEOUT": "45",
        "TRIMODE_EXTRA_ARGS": "--engine.max_num_seqs 8  --server.max_n 4",
        "TRIMODE_API_KEY": "sk-test",
    })
    assert out["argv"] == [
        "serve", "--config", "/app/configs/nemotron-labs-diffusion-8b.toml",
        "--model", "/models/Nemotron-Labs-Diffusion-8B", "--served-model-name", "nld-8b", "--log-level", "debug",
        "--shutdown-timeout", "45", "--engine.max_num_seqs", "8", "--server.max_n", "4",
        "--host", "0.0.0.0", "--port", "8000"]
    assert out["key"] == "sk-test"  # through the environment, never on the command line
    assert not any("sk-test" in a for a in out["argv"])


def test_entrypoint_defaults_key_file_and_commands(tmp_path):
    assert _run_entrypoint(tmp_path, [], {}) == {"argv": ["serve"], "key": None}
    assert _run_entrypoint(tmp_path, ["--port", "9000"], {"TRIMODE_API_KEY": ""})["key"] is None
    secret = tmp_path / "key"
    secret.write_text("sk-from-file\n")
    assert _run_entrypoint(tmp_path, [], {"TRIMODE_API_KEY_FILE": str(secret)})["key"] == "sk-from-file"
    # a first argument that is not a flag runs as a command (docker run -it trimode:cpu bash)
    proc = subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), "echo", "hello"], capture_output=True, text=True,
                          timeout=30)
    assert proc.stdout == "hello\n"
    bad = subprocess.run(["bash", str(DOCKER / "entrypoint.sh")], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "TRIMODE_API_KEY_FILE": str(tmp_path / "missing")})
    assert bad.returncode == 2 and "not readable" in bad.stderr


def _healthcheck_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("trimode_healthcheck", DOCKER / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_healthcheck_finds_the_port(tmp_path, monkeypatch):
    hc = _healthcheck_module()
    assert hc.port_from_argv(["/opt/venv/bin/python", "/opt/venv/bin/trimode", "serve", "--port", "9001"]) == 9001
    assert hc.port_from_argv(["trimode", "serve", "--port=9002", "--port", "9003"]) == 9003
    assert hc.port_from_argv(["trimode", "generate", "--port", "9004"]) is None
    assert hc.port_from_argv(["trimode", "serve", "--port", "x"]) is None
    proc = tmp_path / "proc"
    for pid, argv in {"1": ["tini", "--", "trimode-entrypoint"], "7": ["python", "trimode", "serve", "--port", "8123"],
                      "self": ["ignored"]}.items():
        (proc / pid).mkdir(parents=True)
        (proc / pid / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
    assert hc.server_port(proc) == 8123
    monkeypatch.setenv("TRIMODE_PORT", "8555")
    assert hc.server_port(tmp_path / "empty") == 8555
    monkeypatch.delenv("TRIMODE_PORT")
    assert hc.server_port(tmp_path / "empty") == 8000


# ----------------------------------------------------------------------------------------------------------------
# compose stack: compose.yaml, prometheus.yml, Grafana provisioning
# ----------------------------------------------------------------------------------------------------------------


def _bind_mounts(service: dict) -> dict[str, Path]:
    """container path -> host path of a service's bind mounts (relative to docker/)."""
    out = {}
    for vol in service.get("volumes", []):
        src, dst = compose_default(vol).split(":")[:2]
        if src.startswith((".", "/")):
            out[dst] = (DOCKER / src).resolve()
    return out


def test_compose_services():
    compose = load_yaml(DOCKER / "compose.yaml")
    services = compose["services"]
    assert {"trimode", "prometheus", "grafana"} <= set(services)

    tm = services["trimode"]
    context = (DOCKER / tm["build"]["context"]).resolve()
    assert context == ROOT and (context / tm["build"]["dockerfile"]).is_file()
    assert compose_default(tm["build"]["args"]["VARIANT"]) == "cpu"
    assert any(compose_default(p).split(":")[-1] == "8000" for p in tm["ports"])
    volumes = [compose_default(v) for v in tm["volumes"]]
    model_vol = next(v for v in volumes if v.split(":")[1] == "/models")
    assert model_vol.split(":")[0] in compose.get("volumes", {}), "the default model volume must be declared"
    assert "trimode-healthcheck" in " ".join(tm["healthcheck"]["test"])
    env = tm["environment"]
    assert {"TRIMODE_MODEL", "TRIMODE_CONFIG", "TRIMODE_API_KEY"} <= set(env)
    import tomllib

    from server.config import ServerConfig

    drains = [ServerConfig().shutdown_timeout] + [tomllib.loads(p.read_text()).get("server", {}).get(
        "shutdown_timeout", 0) for p in (ROOT / "configs").glob("*.toml")]
    if compose_default(env["TRIMODE_SHUTDOWN_TIMEOUT"]):
        drains.append(float(compose_default(env["TRIMODE_SHUTDOWN_TIMEOUT"])))
    grace = int(str(tm["stop_grace_period"]).rstrip("s"))
    assert grace > max(drains), f"docker stop ({grace} s) must outlast the longest drain ({max(drains)} s)"

    prom_mounts = _bind_mounts(services["prometheus"])
    assert prom_mounts["/etc/prometheus/prometheus.yml"] == DOCKER / "prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    for mount in (_bind_mounts(services["grafana"]), prom_mounts):
        for host in mount.values():
            assert host.exists(), f"bind-mount source {host} is missing"

    gpu = load_yaml(DOCKER / "compose.gpu.yaml")["services"]["trimode"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_prometheus_scrapes_trimode_metrics():
    compose = load_yaml(DOCKER / "compose.yaml")
    prom = load_yaml(DOCKER / "prometheus.yml")
    jobs = [j for j in prom["scrape_configs"]
            if any("trimode:8000" in sc["targets"] for sc in j.get("static_configs", []))]
    assert jobs, "no scrape job targets trimode:8000"
    job = jobs[0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", prom.get("global", {}).get("scrape_interval")) == "5s"
    assert "trimode" in compose["services"]  # the target's host is the compose service name


def test_grafana_provisioning():
    compose = load_yaml(DOCKER / "compose.yaml")
    grafana = compose["services"]["grafana"]
    mounts = _bind_mounts(grafana)
    ds_dir = mounts["/etc/grafana/provisioning/datasources"]
    sources = [d for f in sorted(ds_dir.glob("*.y*ml")) for d in load_yaml(f)["datasources"]]
    prom = next(d for d in sources if d["type"] == "prometheus")
    assert prom["url"] == "http://prometheus:9090" and prom["uid"] == "prometheus"
    assert "9090" in str(compose["services"]["prometheus"]["ports"][0])

    prov_dir = mounts["/etc/grafana/provisioning/dashboards"]
    providers = [p for f in sorted(prov_dir.glob("*.y*ml")) for p in load_yaml(f)["providers"]]
    path = providers[0]["options"]["path"]
    assert mounts[path] == DASHBOARD.parent, "the dashboard provider must read the mounted dashboard folder"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(path) and (DASHBOARD.parent / Path(home).name).is_file()


# ----------------------------------------------------------------------------------------------------------------
# the dashboard
# ----------------------------------------------------------------------------------------------------------------


def test_dashboard_is_the_generator_output():
    sys.path.insert(0, str(DOCKER / "grafana"))
    try:
        import build_dashboard
    finally:
        sys.path.pop(0)
    assert DASHBOARD.read_text() == build_dashboard.render(), "run: python docker/grafana/build_dashboard.py"


def test_dashboard_panels_have_promql():
    board = dashboard()
    assert board["uid"] == "trimode"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert "model_name" in variables and "datasource" in variables
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    panels = dashboard_panels()
    assert len(panels) >= 15
    cells = set()
    for panel in panels:
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no query"
        for t in targets:
            expr = t.get("expr", "")
            assert expr.strip(), f"panel {panel['title']!r} has an empty expression"
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            assert 'model_name=~"$model_name"' in expr, f"{expr!r} ignores the $model_name variable"
            assert promql_metric_names(expr), f"{expr!r} uses no trimode: metric"
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & cell, f"panel {panel['title']!r} overlaps another"
        cells |= cell


def test_dashboard_covers_the_issue():
    used = {metric_family(n) for e in dashboard_exprs() for n in promql_metric_names(e)}
    wanted = {
        "trimode:num_requests_running", "trimode:num_requests_waiting", "trimode:kv_cache_usage_perc",
        "trimode:time_to_first_token_seconds", "trimode:inter_token_latency_seconds",
        "trimode:e2e_request_latency_seconds", "trimode:request_queue_time_seconds",
        "trimode:generation_tokens_total", "trimode:forward_passes_total", "trimode:prompt_tokens_total",
        "trimode:spec_decode_num_accepted_tokens_total", "trimode:spec_decode_num_drafts_total",
        "trimode:diffusion_denoise_steps_per_block", "trimode:requests_rejected_total",
        "trimode:http_requests_client_disconnected_total", "trimode:num_preemptions_total", "trimode:batch_size",
        "trimode:request_success_total",
    }
    assert wanted <= used, f"dashboard lacks {sorted(wanted - used)}"
    exprs = "\n".join(dashboard_exprs())
    assert "histogram_quantile(0.99, sum by (le, mode) (rate(trimode:time_to_first_token_seconds_bucket" in exprs
    assert re.search(r"1 \+ sum\(rate\(trimode:spec_decode_num_accepted_tokens_total\{[^}]*\}\[1m\]\)\) / "
                     r"sum\(rate\(trimode:spec_decode_num_drafts_total", exprs)
    assert re.search(r"sum by \(mode\) \(rate\(trimode:generation_tokens_total\{[^}]*\}\[1m\]\)\) / "
                     r"sum by \(mode\) \(rate\(trimode:forward_passes_total", exprs)


def test_dashboard_promql_parses():
    parser = pytest.importorskip("promql_parser", reason="promql-parser not installed (pip install promql-parser)")
    for expr in dashboard_exprs():
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        parser.parse(substitute_variables(expr))


# ----------------------------------------------------------------------------------------------------------------
# the dashboard against a live server's /metrics
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.server_fixtures import write_served_checkpoint

    path = tmp_path_factory.mktemp("deploy") / "trimode-deploy-tiny"
    path.mkdir()
    return write_served_checkpoint(path)


@pytest.fixture(scope="module")
def live_metrics(tiny_model_dir) -> Exposition:
    """/metrics of a real server (create_app over the engine, uvicorn on a free port) after one request per mode."""
    try:
        from engine.config import EngineConfig
        from engine.engine import Engine
        from server.app import create_app
        from server.config import ServerConfig
    except ImportError as exc:  # the server package is not importable: nothing to check the dashboard against
        pytest.skip(f"server.app.create_app is not importable yet: {exc}")
    from tests.server_fixtures import live_server

    engine = Engine(EngineConfig(model=str(tiny_model_dir), device="cpu", num_kv_tokens=4096, max_num_seqs=8))
    with live_server(create_app(engine, ServerConfig())) as url, httpx.Client(base_url=url, timeout=120) as client:
        for mode in MODES:
            r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "mode": mode})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return Exposition(r.text)


def test_every_dashboard_metric_is_served(live_metrics):
    problems = check_dashboard_against(live_metrics)
    assert not problems, "\n".join(problems)


def test_live_metrics_have_the_labels_the_dashboard_splits_by(live_metrics):
    expo = live_metrics
    assert {"model_name", "mode"} <= expo.label_names("trimode:generation_tokens_total")
    assert {"model_name", "mode"} <= expo.label_names("trimode:forward_passes_total")
    assert "forward_kind" in expo.label_names("trimode:batch_size_count")
    assert "finished_reason" in expo.label_names("trimode:request_success_total")
    assert "reason" in expo.label_names("trimode:requests_rejected_total")
    for mode in MODES:  # the requests above were counted per mode
        line = next(ln for ln in expo.text.splitlines()
                    if ln.startswith("trimode:generation_tokens_total{") and f'mode="{mode}"' in ln)
        assert float(line.rsplit(" ", 1)[1]) >= 1


def test_check_catches_a_missing_metric(live_metrics):
    expo = Exposition(live_metrics.text.replace("trimode:forward_passes", "trimode:renamed_passes"))
    problems = check_dashboard_against(expo)
    assert any("trimode:forward_passes_total" in p for p in problems)


@pytest.mark.slow
def test_dashboard_queries_return_data_in_prometheus(tiny_model_dir, tmp_path):
    """A real Prometheus scrapes a live server under mixed-mode load; every dashboard query must return series.

    Stronger than the name check: a label mismatch across `/` or a selector that matches nothing gives an empty
    result. Runs only where a `prometheus` binary is found (PATH, or TRIMODE_PROMETHEUS=/path/to/prometheus).
    """
    binary = os.environ.get("TRIMODE_PROMETHEUS") or shutil.which("prometheus")
    if not binary:
        pytest.skip("no prometheus binary (put it on PATH or set TRIMODE_PROMETHEUS)")
    from engine.config import EngineConfig
    from engine.engine import Engine
    from server.app import create_app
    from server.config import ServerConfig
    from tests.server_fixtures import free_port, live_server

    engine = Engine(EngineConfig(model=str(tiny_model_dir), device="cpu", num_kv_tokens=4096, max_num_seqs=8))
    with live_server(create_app(engine, ServerConfig())) as url:
        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: trimode\n"
            f"    static_configs: [{{targets: ['{url.removeprefix('http://')}']}}]\n")
        args = [f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}"]
        prom = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            stop = time.monotonic() + 12

            def traffic(offset: int) -> None:
                with httpx.Client(base_url=url, timeout=60) as client:
                    i = offset
                    while time.monotonic() < stop:
                        client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 16, "n": 2,
                                                             "mode": MODES[i % 3]})
                        i += 1

            workers = [threading.Thread(target=traffic, args=(k,)) for k in range(3)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()

            def empty_queries() -> list[str]:
                empty = []
                for expr in dashboard_exprs():
                    if expr.startswith("label_values("):
                        continue
                    r = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query", timeout=10,
                                  params={"query": expr.replace("$model_name", ".*")}).json()
                    assert r["status"] == "success", (expr, r)
                    if not r["data"]["result"]:
                        empty.append(expr)
                return empty

            # rates need two scrapes of the series, and Prometheus starts at its own pace: poll, up to a bound
            stop = time.monotonic() + 60
            while (empty := empty_queries()) and time.monotonic() < stop:
                time.sleep(1)
            assert not empty, "queries with no data:\n" + "\n".join(empty)
        finally:
            prom.terminate()
            prom.wait(timeout=30)


# ----------------------------------------------------------------------------------------------------------------
# the container's command path: entrypoint -> `trimode serve` CLI -> /health, /ready, API key, SIGTERM drain
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_entrypoint_serves_and_drains(tiny_model_dir, tmp_path):
    from tests.server_fixtures import free_port

    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "trimode").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m server \"$@\"\n")
    (shim / "trimode").chmod(0o755)
    key = tmp_path / "api-key"
    key.write_text("sk-deploy\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIMODE_")}
    env.update(PATH=f"{shim}{os.pathsep}{env['PATH']}", PYTHONPATH=str(ROOT), TRIMODE_MODEL=str(tiny_model_dir),
               TRIMODE_API_KEY_FILE=str(key), TRIMODE_LOG_LEVEL="warning", TRIMODE_SHUTDOWN_TIMEOUT="5",
               TRIMODE_EXTRA_ARGS="--engine.device cpu --engine.num_kv_tokens 4096")
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(["bash", str(DOCKER / "entrypoint.sh"), "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"server exited: {(tmp_path / 'server.log').read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.25)
        hc = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], capture_output=True, timeout=30,
                            env={**env, "TRIMODE_HEALTH_URL": f"{url}/health"})
        assert hc.returncode == 0, hc.stderr
        assert httpx.get(f"{url}/ready", timeout=60).status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-deploy"}, timeout=10)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == tiny_model_dir.name
        r = httpx.post(f"{url}/v1/completions", headers={"Authorization": "Bearer sk-deploy"}, timeout=60,
                       json={"prompt": "Hi", "max_tokens": 4, "mode": "self_spec"})
        assert r.status_code == 200, r.text
        metrics = httpx.get(f"{url}/metrics", timeout=10)  # not behind the key: Prometheus scrapes it as is
        assert metrics.status_code == 200
        assert not check_dashboard_against(Exposition(metrics.text))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    dead = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], capture_output=True, timeout=30,
                          env={**env, "TRIMODE_HEALTH_URL": f"{url}/health", "TRIMODE_HEALTH_TIMEOUT": "2"})
    assert dead.returncode == 1


# ----------------------------------------------------------------------------------------------------------------
# docs/memory.md: memory figures of the released checkpoints, recomputed from their geometry
# ----------------------------------------------------------------------------------------------------------------

# nemotron-labs-diffusion.md §2.3; the -Base checkpoints share the geometry of their Instruct siblings
GEOMETRY = {  # size: (hidden, intermediate, layers)
    "3B": (3072, 9216, 26),
    "8B": (4096, 14336, 34),
    "14B": (5120, 16384, 40),
}
VOCAB, HEADS, KV_HEADS, HEAD_DIM, LORA_RANK = 131072, 32, 8, 128, 128
# total memory as CUDA reports it to PyTorch (torch.cuda.mem_get_info): H100 80 GB 79.11 GiB; H200 141 GB about
# 139.8 GiB (its 143,771 MiB less the ~0.5 GiB the driver keeps, as on the H100's 81,559 MiB)
GPUS = {"80 GB": round(79.11 * 2**30), "141 GB": round(139.8 * 2**30)}
UTILIZATION, RESERVE, KV_BLOCK = 0.9, 2 * 2**30, 256


def memory_figures(size: str, lora: bool) -> dict[str, int]:
    hidden, inter, layers = GEOMETRY[size]
    q_out = HEADS * HEAD_DIM  # 4096 for every size: not hidden_size for the 3B and 14B
    per_layer = (hidden * q_out + 2 * hidden * KV_HEADS * HEAD_DIM + q_out * hidden  # q, k, v, o
                 + 3 * hidden * inter + 2 * hidden)  # gate, up, down; two RMSNorms
    params = VOCAB * hidden + layers * per_layer + hidden + VOCAB * hidden  # embeddings, layers, norm, head
    lora_params = layers * LORA_RANK * (q_out + hidden) if lora else 0
    weight_bytes = 2 * (params + lora_params)
    kv_per_token = 2 * layers * KV_HEADS * HEAD_DIM * 2
    out = {"params": params, "lora_params": lora_params, "weight_bytes": weight_bytes, "kv_per_token": kv_per_token}
    for gpu, total in GPUS.items():
        budget = total * UTILIZATION - weight_bytes - RESERVE
        out[gpu] = math.floor(budget / (kv_per_token * KV_BLOCK)) * KV_BLOCK
    return out


def test_parameter_count_matches_the_engine_model():
    torch = pytest.importorskip("torch")
    from engine.model import TriModeModel
    from engine.model_config import ModelConfig
    from tests.checkpoints import nld_raw_config

    for size, (hidden, inter, layers) in GEOMETRY.items():
        raw = nld_raw_config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                             max_position_embeddings=262144, torch_dtype="bfloat16")
        with torch.device("meta"):
            model = TriModeModel(ModelConfig.from_dict(raw))
        assert sum(p.numel() for p in model.parameters()) == memory_figures(size, lora=False)["params"], size


def test_kv_bytes_per_token_match_the_reference():
    # nemotron-labs-diffusion.md §3: 3B 104 KiB, 8B 136 KiB, 14B 160 KiB
    assert [memory_figures(s, False)["kv_per_token"] // 1024 for s in GEOMETRY] == [104, 136, 160]


def test_memory_doc_has_the_figures():
    doc = (ROOT / "docs" / "memory.md").read_text()
    for size in GEOMETRY:
        for lora, name in ((True, f"Nemotron-Labs-Diffusion-{size}"), (False, f"Nemotron-Labs-Diffusion-{size}-Base")):
            fig = memory_figures(size, lora)
            row = next((ln for ln in doc.splitlines() if ln.startswith(f"| {name} |")), None)
            assert row is not None, f"docs/memory.md has no table row for {name}"
            cells = [c.strip() for c in row.strip("|").split("|")]
            expected = [name, f"{fig['params']:,}", f"{fig['lora_params']:,}",
                        f"{fig['weight_bytes']:,} ({fig['weight_bytes'] / 2**30:.2f} GiB)",
                        f"{fig['kv_per_token']:,} ({fig['kv_per_token'] // 1024} KiB)",
                        f"{fig['80 GB']:,}", f"{fig['141 GB']:,}"]
            assert cells == expected, f"{name}: docs/memory.md says {cells}, the geometry gives {expected}"

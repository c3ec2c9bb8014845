#!/usr/bin/env python3
"""Write docker/grafana/dashboards/trimode.json, the Grafana dashboard of the compose stack.

Edit the panels here and rerun `python docker/grafana/build_dashboard.py`; tests/test_deploy.py checks that the
committed JSON is this script's output and that every metric its queries use appears in a live server's /metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "trimode.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model_name=~"$model_name"'  # every selector is filtered by the dashboard's model_name variable
R = "[1m]"


def quantiles(metric: str) -> list[tuple[str, str]]:
    """p50 and p99 per mode, p90 over all modes, of a histogram with a mode label."""
    rate = f"rate({metric}_bucket{{{M}}}{R})"
    return [
        (f"histogram_quantile(0.5, sum by (le, mode) ({rate}))", "{{mode}} p50"),
        (f"histogram_quantile(0.99, sum by (le, mode) ({rate}))", "{{mode}} p99"),
        (f"histogram_quantile(0.9, sum by (le) ({rate}))", "all modes p90"),
    ]


# (title, unit, [(expr, legend)], description); None starts a new row: (None, row title)
PANELS: list = [
    (None, "Load"),
    ("Requests running and waiting", "short", [
        (f"sum(trimode:num_requests_running{{{M}}})", "running"),
        (f"sum(trimode:num_requests_waiting{{{M}}})", "waiting"),
    ], "Sequences in the running batch and waiting for admission (n > 1 counts n)."),
    ("KV cache usage", "percentunit", [
        (f"max by (model_name) (trimode:kv_cache_usage_perc{{{M}}})", "{{model_name}}"),
    ], "Fraction of KV blocks in use (0-1). Near 1, admission stalls and sequences get preempted."),
    ("Preemptions", "ops", [
        (f"sum(rate(trimode:num_preemptions_total{{{M}}}{R}))", "preemptions/s"),
    ], "Sequences preempted by recompute when KV blocks ran out."),
    ("Prefix cache hit rate", "percentunit", [
        (f"sum by (model_name) (rate(trimode:prefix_cache_hits_total{{{M}}}{R})) / "
         f"sum by (model_name) (rate(trimode:prefix_cache_queries_total{{{M}}}{R}))", "{{model_name}}"),
    ], "Share of the prompt tokens looked up in the prefix cache that were found there (their prefill skipped), "
       "in tokens, at each request's first admission. Requests asking for prompt_logprobs do not look up."),
    ("Rejected requests by reason", "reqps", [
        (f"sum by (reason) (rate(trimode:requests_rejected_total{{{M}}}{R}))", "{{reason}}"),
    ], "Requests refused before they started (503 queue full / draining / engine dead, 413 body too large)."),
    ("Client disconnects", "reqps", [
        (f"sum(rate(trimode:http_requests_client_disconnected_total{{{M}}}{R}))", "disconnects/s"),
    ], "Clients that went away before the end; their sequences are aborted and their KV freed."),
    ("Finished requests by reason", "reqps", [
        (f"sum by (mode, finished_reason) (rate(trimode:request_success_total{{{M}}}{R}))",
         "{{mode}} {{finished_reason}}"),
    ], "Finished sequences per second by mode and finished_reason (stop, length, abort)."),
    (None, "Latency"),
    ("Time to first token", "s", quantiles("trimode:time_to_first_token_seconds"),
     "Arrival to the first output token, per mode (the prefill's seed token is final in every mode)."),
    ("Inter-token latency", "s", quantiles("trimode:inter_token_latency_seconds"),
     "Gap between consecutive outputs: per token in ar, per accepted run in self_spec, per block in diffusion."),
    ("End-to-end request latency", "s", quantiles("trimode:e2e_request_latency_seconds"),
     "Arrival to finish."),
    ("Queue time", "s", quantiles("trimode:request_queue_time_seconds") + [
        (f"sum(rate(trimode:request_queue_time_seconds_sum{{{M}}}{R})) / "
         f"sum(rate(trimode:request_queue_time_seconds_count{{{M}}}{R}))", "mean"),
    ], "Arrival to the start of the request's first forward."),
    (None, "Throughput and modes"),
    ("Output tokens/s by mode", "short", [
        (f"sum by (mode) (rate(trimode:generation_tokens_total{{{M}}}{R}))", "{{mode}}"),
    ], "Generated tokens per second, per decoding mode."),
    ("Prompt tokens/s by mode", "short", [
        (f"sum by (mode) (rate(trimode:prompt_tokens_total{{{M}}}{R}))", "{{mode}}"),
    ], "Prompt tokens admitted per second, per decoding mode."),
    ("Tokens per forward by mode", "short", [
        (f"sum by (mode) (rate(trimode:generation_tokens_total{{{M}}}{R})) / "
         f"sum by (mode) (rate(trimode:forward_passes_total{{{M}}}{R}))", "{{mode}}"),
    ], "Generated tokens per decode forward (every forward kind counts): ar is 1, self_spec and diffusion more."),
    ("self_spec acceptance length", "short", [
        (f"1 + sum(rate(trimode:spec_decode_num_accepted_tokens_total{{{M}}}{R})) / "
         f"sum(rate(trimode:spec_decode_num_drafts_total{{{M}}}{R}))", "acceptance length"),
        (f"sum(rate(trimode:spec_decode_num_accepted_tokens_total{{{M}}}{R})) / "
         f"sum(rate(trimode:spec_decode_num_draft_tokens_total{{{M}}}{R}))", "acceptance rate"),
    ], "Tokens committed per draft/verify iteration, bonus token included (NVIDIA's acceptance length); and the "
       "fraction of drafted tokens accepted."),
    ("auto: iterations by choice", "ops", [
        (f"sum by (chosen) (rate(trimode:auto_iterations_total{{{M}}}{R}))", "{{chosen}}"),
        (f"sum(rate(trimode:auto_iterations_total{{{M}, chosen=\"self_spec\"}}{R})) / "
         f"sum(rate(trimode:auto_iterations_total{{{M}}}{R}))", "self_spec share"),
    ], "What mode auto decoded its iterations with, per second: ar decodes and self_spec draft/verify rounds (never "
       "diffusion, whose output is not the AR model's); the self_spec share rises at low load and falls under load."),
    ("Structured outputs: grammar-forced tokens", "short", [
        (f"sum(rate(trimode:grammar_forced_tokens_total{{{M}}}{R}))", "forced tokens/s"),
        (f"sum(rate(trimode:grammar_forced_tokens_total{{{M}}}{R})) / "
         f"sum(rate(trimode:generation_tokens_total{{{M}}}{R}))", "share of generated tokens"),
    ], "Tokens a request's grammar forced (the punctuation and keys between JSON values), emitted without asking "
       "the model: jump-forward in ar, forced drafts in self_spec."),
    ("Diffusion denoise steps per block", "short", [
        (f"sum(rate(trimode:diffusion_denoise_steps_per_block_sum{{{M}}}{R})) / "
         f"sum(rate(trimode:diffusion_denoise_steps_per_block_count{{{M}}}{R}))", "mean"),
        (f"histogram_quantile(0.9, sum by (le) (rate(trimode:diffusion_denoise_steps_per_block_bucket{{{M}}}{R})))",
         "p90"),
    ], "Denoise forwards spent per committed diffusion block (fewer with a lower threshold or step budget)."),
    ("Weight passes per generated token", "short", [
        (f"sum(rate(trimode:model_forwards_total{{{M}}}{R})) / "
         f"sum(rate(trimode:generation_tokens_total{{{M}}}{R}))", "weight passes / token"),
    ], "Engine forwards (each one pass over the weights, carrying every running sequence's next forward whatever "
       "its kind) per generated token, all modes together: the GPU cost of a token. Mixing modes lowers it."),
    ("Weight passes/s and the kinds they carried", "ops", [
        (f"sum(rate(trimode:model_forwards_total{{{M}}}{R}))", "weight passes"),
        (f"sum by (forward_kind) (rate(trimode:batch_size_count{{{M}}}{R}))", "carrying {{forward_kind}}"),
    ], "Engine forwards per second, and how many of them carried rows of each forward kind (one forward carries "
       "several kinds, so the kinds add up to more than the forwards)."),
    ("Rows per forward by forward kind", "short", [
        (f"sum by (forward_kind) (rate(trimode:forward_rows_sum{{{M}}}{R})) / "
         f"scalar(sum(rate(trimode:model_forwards_total{{{M}}}{R})))", "{{forward_kind}}"),
    ], "Mean query rows (tokens) of each forward kind per engine forward: how a forward's rows split between "
       "prefill chunks, ar decodes, verify, commit, draft and denoise blocks."),
    ("Batch size by forward kind", "short", [
        (f"sum by (forward_kind) (rate(trimode:batch_size_sum{{{M}}}{R})) / "
         f"sum by (forward_kind) (rate(trimode:batch_size_count{{{M}}}{R}))", "{{forward_kind}} mean"),
    ], "Mean sequences of each forward kind per forward that carried that kind (prefill, ar_decode, denoise, "
       "commit, draft, verify)."),
]


def build() -> dict:
    panels, pid, x, y = [], 1, 0, 0
    for entry in PANELS:
        if entry[0] is None:
            y += 0 if x == 0 else 8
            x = 0
            panels.append({"id": pid, "type": "row", "title": entry[1], "collapsed": False, "panels": [],
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
            pid, y = pid + 1, y + 1
            continue
        title, unit, targets, desc = entry
        panels.append({
            "id": pid, "type": "timeseries", "title": title, "description": desc, "datasource": DS,
            "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit, "min": 0,
                                         "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                                                    "spanNulls": True, "showPoints": "never"}},
                            "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": [{"datasource": DS, "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                         "range": True, "editorMode": "code"} for i, (expr, legend) in enumerate(targets)],
        })
        pid += 1
        x += 8
        if x >= 24:
            x, y = 0, y + 8
    return {
        "uid": "trimode", "title": "trimode", "description": "trimode: tri-mode diffusion LM serving",
        "tags": ["trimode", "llm", "serving"], "timezone": "browser", "editable": True, "graphTooltip": 1,
        "schemaVersion": 39, "version": 1, "refresh": "5s", "time": {"from": "now-30m", "to": "now"},
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {"selected": False, "text": "Prometheus", "value": "prometheus"}, "hide": 0,
             "refresh": 1, "options": []},
            {"name": "model_name", "label": "Model", "type": "query", "datasource": DS,
             "definition": "label_values(trimode:num_requests_running, model_name)",
             "query": {"query": "label_values(trimode:num_requests_running, model_name)", "refId": "model_name"},
             "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1, "hide": 0,
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": []},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")

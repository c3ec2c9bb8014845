"""Prometheus metrics, vLLM-shaped with the `trimode:` prefix, in a registry owned by one app.

Every series carries `model_name`; per-request series also carry `mode`. Engine-side counters come from each
step's `StepStats`; latencies (TTFT, inter-token, end-to-end, queue) are measured in the async layer. Label
combinations are created up front so dashboards see zeros rather than missing series.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.decoding.modes import (
    AUTO_CHOICES,
    AUTO_ITERATIONS,
    COUNTERS,
    DENOISE_STEPS_PER_BLOCK,
    GRAMMAR_FORCED_TOKENS,
    MODES,
    OBSERVATIONS,
    SPEC_ACCEPTED_TOKENS,
    SPEC_DRAFT_TOKENS,
    SPEC_DRAFTS,
)
from engine.forward import Forward
from engine.sequence import StepStats

FORWARD_KINDS = tuple(f.value for f in Forward)
FINISH_REASONS = ("stop", "length", "abort")
REJECT_REASONS = ("queue_full", "queue_tokens", "queue_kv", "queue_timeout", "draining", "engine_dead",
                  "body_too_large")
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80,
                160, 640, 2560)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
STEPS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# the decoders' counters and observations (StepStats.counters / .observations) -> the ServerMetrics attribute of
# the series each one feeds; checked below so that a new counter without a series stops the import, not a step
# (the series' attribute, its label values after model_name)
_COUNTER_SERIES = {SPEC_DRAFTS: ("spec_drafts", ()), SPEC_DRAFT_TOKENS: ("spec_draft_tokens", ()),
                   SPEC_ACCEPTED_TOKENS: ("spec_accepted_tokens", ()),
                   GRAMMAR_FORCED_TOKENS: ("grammar_forced_tokens", ()),
                   **{AUTO_ITERATIONS[c]: ("auto_iterations", (c,)) for c in AUTO_CHOICES}}
_HISTOGRAM_SERIES = {DENOISE_STEPS_PER_BLOCK: "denoise_steps"}
if set(_COUNTER_SERIES) != set(COUNTERS) or set(_HISTOGRAM_SERIES) != set(OBSERVATIONS):
    raise ImportError("server.metrics: every counter and observation in engine.decoding.modes needs one series")


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        prometheus_client.disable_created_metrics()  # as vLLM: no *_created series
        self.registry = r = CollectorRegistry()
        m, mm = ["model_name"], ["model_name", "mode"]
        p = "trimode:"
        self.num_requests_running = Gauge(p + "num_requests_running", "Sequences in the running batch.", m,
                                          registry=r)
        self.num_requests_waiting = Gauge(p + "num_requests_waiting", "Sequences waiting for admission.", m,
                                          registry=r)
        self.kv_cache_usage_perc = Gauge(p + "kv_cache_usage_perc", "KV blocks in use, 0..1.", m, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens admitted.", mm, registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens emitted.", mm, registry=r)
        self.forward_passes = Counter(p + "forward_passes", "Decode forwards per sequence (any kind).", mm,
                                      registry=r)
        self.request_success = Counter(p + "request_success", "Finished sequences.",
                                       mm + ["finished_reason"], registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token.", mm,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Gap between consecutive outputs (chunks).", mm,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Arrival to finish.", mm, buckets=E2E_BUCKETS,
                             registry=r)
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Arrival to the start of the forward that gave "
                                    "its first token (the queue wait, for unchunked prefills).",
                                    mm, buckets=E2E_BUCKETS, registry=r)
        self.num_preemptions = Counter(p + "num_preemptions", "Preemptions by recompute.", m, registry=r)
        self.prefix_cache_queries = Counter(p + "prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                            "cache (at each request's first admission).", m, registry=r)
        self.prefix_cache_hits = Counter(p + "prefix_cache_hits", "Prompt tokens found in the prefix cache (their "
                                         "prefill skipped).", m, registry=r)
        self.model_forwards = Counter(p + "model_forwards", "Engine forwards, i.e. passes over the weights: one per "
                                      "step, carrying every kind of forward at once.", m, registry=r)
        self.batch_size = Histogram(p + "batch_size", "Sequences of each forward kind per forward (one observation "
                                    "per kind a forward carried).", ["model_name", "forward_kind"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.forward_rows = Histogram(p + "forward_rows", "Query rows (tokens) of each forward kind per forward (one "
                                      "observation per kind a forward carried).", ["model_name", "forward_kind"],
                                      buckets=ROWS_BUCKETS, registry=r)
        self.iteration_tokens = Histogram(p + "iteration_tokens_total", "Query tokens per forward.", m,
                                          buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
                                          registry=r)
        self.spec_drafts = Counter(p + "spec_decode_num_drafts", "self_spec draft/verify iterations.", m,
                                   registry=r)
        self.spec_draft_tokens = Counter(p + "spec_decode_num_draft_tokens", "self_spec drafted tokens.", m,
                                         registry=r)
        self.spec_accepted_tokens = Counter(p + "spec_decode_num_accepted_tokens",
                                            "self_spec accepted drafts (bonus token excluded).", m, registry=r)
        self.grammar_forced_tokens = Counter(p + "grammar_forced_tokens", "Tokens a request's grammar forced, "
                                             "emitted without drafting them (jump-forward).", m, registry=r)
        self.auto_iterations = Counter(p + "auto_iterations", "auto mode's iterations by what it chose: an ar "
                                       "decode or a self_spec draft/verify round.", ["model_name", "chosen"],
                                       registry=r)
        self.denoise_steps = Histogram(p + "diffusion_denoise_steps_per_block", "Denoise forwards per block.", m,
                                       buckets=STEPS_BUCKETS, registry=r)
        self.requests_rejected = Counter(p + "requests_rejected", "Requests refused before they started.",
                                         ["model_name", "reason"], registry=r)
        self.client_disconnected = Counter(p + "http_requests_client_disconnected",
                                           "Requests whose client went away before the end.", m, registry=r)
        self.engine_restarts = Counter(p + "engine_restarts", "Engine processes respawned after one died.", m,
                                       registry=r)
        self.model_name = model_name
        for metric in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage_perc,
                       self.num_preemptions, self.prefix_cache_queries, self.prefix_cache_hits, self.model_forwards,
                       self.iteration_tokens, self.spec_drafts, self.spec_draft_tokens, self.spec_accepted_tokens,
                       self.grammar_forced_tokens, self.denoise_steps, self.client_disconnected, self.engine_restarts):
            metric.labels(model_name)
        for mode in MODES:
            for metric in (self.prompt_tokens, self.generation_tokens, self.forward_passes, self.ttft, self.itl,
                           self.e2e, self.queue_time):
                metric.labels(model_name, mode)
            for reason in FINISH_REASONS:
                self.request_success.labels(model_name, mode, reason)
        for chosen in AUTO_CHOICES:
            self.auto_iterations.labels(model_name, chosen)
        for kind in FORWARD_KINDS:
            self.batch_size.labels(model_name, kind)
            self.forward_rows.labels(model_name, kind)
        for reason in REJECT_REASONS:
            self.requests_rejected.labels(model_name, reason)

    def on_step(self, stats: StepStats) -> None:
        """Accumulate one engine step's counters."""
        name = self.model_name
        if stats.num_model_forwards:
            self.model_forwards.labels(name).inc(stats.num_model_forwards)
            self.iteration_tokens.labels(name).observe(stats.num_query_tokens)
        for kind, seqs in stats.seqs_by_forward.items():
            self.batch_size.labels(name, kind).observe(seqs)
            self.forward_rows.labels(name, kind).observe(stats.rows_by_forward[kind])
        for mode, count in stats.decode_forwards_by_mode.items():
            self.forward_passes.labels(name, mode).inc(count)
        for key, amount in stats.counters.items():
            series, labels = _COUNTER_SERIES[key]
            getattr(self, series).labels(name, *labels).inc(amount)
        for key, values in stats.observations.items():
            series = getattr(self, _HISTOGRAM_SERIES[key]).labels(name)
            for value in values:
                series.observe(value)
        if stats.num_preemptions:
            self.num_preemptions.labels(name).inc(stats.num_preemptions)
        if stats.prefix_cache_queries:
            self.prefix_cache_queries.labels(name).inc(stats.prefix_cache_queries)
            self.prefix_cache_hits.labels(name).inc(stats.prefix_cache_hits)

    def set_gauges(self, running: int, waiting: int, kv_usage: float) -> None:
        self.num_requests_running.labels(self.model_name).set(running)
        self.num_requests_waiting.labels(self.model_name).set(waiting)
        self.kv_cache_usage_perc.labels(self.model_name).set(kv_usage)

    def reject(self, reason: str) -> None:
        self.requests_rejected.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Engine: add / abort / step over the scheduler, the runner and the decoders. Single-threaded, token ids only.

Builds the parts: the runner (weights, KV memory) sizes the pool, the scheduler owns its pages (`BlockManager`).
`step()` runs at most one forward: the scheduler puts every running sequence's next forward, whatever its kind,
in one batch (one pass over the weights), the runner returns its logit rows, each sequence's decoder turns them
into an Outcome, and `_apply_outcome` applies it the same way for every mode:
append the tokens, cut at the first stop id, trim to `max_tokens`, commit the K/V kept (cropping the rest), free
the blocks of finished sequences. The outcomes' counters are summed into the step's `StepStats` by name.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from engine.batch import Batch
from engine.config import EngineConfig
from engine.decoding.auto import planner_for_engine
from engine.decoding.base import DecoderContext, Outcome, emit_tokens
from engine.decoding.registry import DECODERS
from engine.forward import Forward, ForwardRequest
from engine.grammar import attach_grammar
from engine.kv_cache import BlockManager
from engine.logits_processing import build_pipeline, choose_next
from engine.parallel.group import TensorParallelError
from engine.policy import RequestPolicy
from engine.runner import ModelRunner
from engine.sampling import token_logprobs
from engine.scheduler import Scheduler
from engine.sequence import RequestOutput, SamplingParams, Sequence, StepStats
from engine.tokenizer import load_tokenizer

log = logging.getLogger("trimode.engine")

BUILTIN_MODEL = Path(__file__).parent / "builtin" / "trimode-tiny"


def default_model_path() -> str:
    if not (BUILTIN_MODEL / "config.json").exists():
        raise FileNotFoundError(f"the built-in model is missing: {BUILTIN_MODEL}/config.json")
    return str(BUILTIN_MODEL)


class BatchError(RuntimeError):
    """A forward (or its postprocess) failed: only the sequences of that batch are affected.

    `request_ids` names them; the caller aborts them (freeing their blocks) and the engine serves on.
    """

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = request_ids
        self.__cause__ = cause


class Engine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        path = config.model or default_model_path()
        self.runner = ModelRunner(config, path)
        info = self.runner.info
        self.model_config = info.config
        self.model_name = Path(path).resolve().name
        self.is_trimode = info.config.is_trimode
        self.tokenizer = load_tokenizer(path)
        stop = list(info.stop_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            stop.append(int(self.tokenizer.eos_token_id))
        self.eos_token_ids = tuple(dict.fromkeys(stop))
        self.mask_token_id = info.config.mask_token_id
        if self.mask_token_id is None and self.tokenizer is not None:
            self.mask_token_id = self.tokenizer.mask_token_id
        blocks = BlockManager(self.runner.num_kv_blocks, self.runner.block_size, config.enable_prefix_caching)
        pool_tokens = blocks.num_blocks * blocks.block_size
        limit = config.max_model_len or info.config.max_position_embeddings
        self.max_model_len = min(limit, pool_tokens)
        self.policy = RequestPolicy(
            self.model_name, self.is_trimode, info.config.vocab_size, self.max_model_len, config.default_mode,
            config.default_block_length or info.config.block_size,
            tuple(sorted({*config.allowed_block_lengths, info.config.block_size})), config.default_threshold,
            kv_page_size=blocks.block_size, kv_num_pages=blocks.num_blocks,
            max_forwards=config.max_forwards_per_request or 2 * self.max_model_len)
        # denoising uses the draft LoRA when the config says so, else when the checkpoint says it was trained for it
        denoise_lora = info.config.diffusion_lora_hint if config.diffusion_lora is None else config.diffusion_lora
        spec_lora = config.draft_lora and info.has_draft_lora
        # auto's planner: this engine's forward costs, measured here in a few seconds, and the checkpoint's acceptance
        auto = planner_for_engine(self.runner, blocks, self.policy, config, path, self.mask_token_id, spec_lora)
        self.decoder_ctx = DecoderContext(self.mask_token_id, spec_lora=spec_lora,
                                          diffusion_lora=info.has_draft_lora and denoise_lora, auto=auto)
        self.scheduler = Scheduler(blocks, self.decoder_ctx, config.max_num_seqs, config.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.last_stats = StepStats()  # a fresh object every step, never mutated afterwards: safe to hand over
        self._rng = torch.Generator().manual_seed(config.seed)

    # ---- request intake -------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Resolve and check a request with this engine's `policy`, then admit it: the entry for callers with no
        server in front (`engine.llm.LLM`, benches, tests). ValueError (an InvalidParam naming the field)."""
        params = self.policy.resolve_params(params)
        self.policy.check_request(prompt_token_ids, params)
        self.admit(request_id, prompt_token_ids, params, arrival_time)

    def admit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
              arrival_time: float | None = None) -> None:
        """Queue a request that `policy` already resolved and checked (the server does, in its own process, before
        the engine loop sees it): nothing is re-checked here but what only the engine knows (a duplicate id)."""
        assert params.mode is not None and params.block_length is not None, "params must be resolved by the policy"
        if request_id in self.seqs:
            raise ValueError(f"request_id '{request_id}' is already running")
        # a grammar ends on EOS even under ignore_eos: past its end nothing is allowed but a stop id
        keep_eos = not params.ignore_eos or params.structured is not None
        stop = set(params.stop_token_ids) | (set(self.eos_token_ids) if keep_eos else set())
        gen = torch.Generator().manual_seed(
            params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._rng)))
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params, frozenset(stop),
                       arrival_time=time.monotonic() if arrival_time is None else arrival_time, generator=gen)
        seq.logits_pipeline = build_pipeline(params, stop_ids=sorted(stop), mask_id=self.mask_token_id)
        if params.structured is not None:
            attach_grammar(seq, self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Drop a request at once and free its KV blocks; no output follows."""
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            seq.finish_reason = "abort"
            self.scheduler.remove(seq)

    # ---- the loop -------------------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Run one forward (or nothing when idle) and return what each touched request emitted."""
        sched = self.scheduler
        preempted_before = sched.num_preemptions
        queries_before, hits_before = sched.prefix_cache_queries, sched.prefix_cache_hits
        batch = sched.schedule()
        stats = StepStats()
        self.last_stats = stats
        stats.prefix_cache_queries = sched.prefix_cache_queries - queries_before
        stats.prefix_cache_hits = sched.prefix_cache_hits - hits_before
        if batch is None:
            stats.num_preemptions = sched.num_preemptions - preempted_before
            return []
        auto = self.decoder_ctx.auto
        try:
            started = auto.clock() if auto is not None else 0.0
            outputs = self._run_batch(batch, stats, preempted_before)
        except TensorParallelError:
            raise  # a rank died or the ranks are out of step: no forward can run after it, the engine is dead
        except Exception as exc:  # noqa: BLE001 - isolate the failure to this batch's requests
            sched.blocks.drop_pending()  # blocks registered for this forward may hold no K/V: never share them
            raise BatchError([s.request_id for s in batch.seqs], exc) from exc
        if auto is not None:  # auto refines its forward costs from every step's time
            auto.observe(batch.requests, auto.clock() - started, self.scheduler.running,
                         waiting=len(self.scheduler.waiting))
        return outputs

    def _run_batch(self, batch: Batch, stats: StepStats, preempted_before: int) -> list[RequestOutput]:
        logits = self.runner.run(batch)
        self.scheduler.blocks.forward_ran()
        stats.num_model_forwards = 1
        stats.forward_kind, stats.batch_size, stats.num_query_tokens = batch.forward, len(batch.seqs), \
            batch.num_query_tokens
        for sec in batch.sections:
            kind = sec.key.forward
            stats.seqs_by_forward[kind] = stats.seqs_by_forward.get(kind, 0) + sec.end - sec.start
            stats.rows_by_forward[kind] = stats.rows_by_forward.get(kind, 0) + sum(
                len(r.token_ids) for r in batch.requests[sec.start:sec.end])
        outputs = []
        for seq, req, rows in zip(batch.seqs, batch.requests, logits):
            seq.num_forwards += 1
            mode = seq.params.mode
            assert mode is not None
            if req.forward == Forward.PREFILL:
                outcome = self._prefill_outcome(seq, req, rows)
            else:
                seq.num_decode_forwards += 1
                stats.decode_forwards_by_mode[mode] = stats.decode_forwards_by_mode.get(mode, 0) + 1
                outcome = DECODERS[mode].outcome_from_logits(seq, req, rows, self.decoder_ctx)
            self._add_to_stats(stats, outcome)
            out = self._apply_outcome(seq, req, outcome)
            if out is not None:
                outputs.append(out)
        stats.num_preemptions = self.scheduler.num_preemptions - preempted_before
        return outputs

    def _prefill_outcome(self, seq: Sequence, req: ForwardRequest, rows: torch.Tensor) -> Outcome:
        if req.all_logits:  # prompt logprobs: row i predicts the prompt token after query position i
            start, k = seq.num_computed_tokens, seq.params.prompt_logprobs
            targets = [p for p in range(start + 1, start + len(req.token_ids) + 1) if p < seq.num_prompt_tokens]
            if targets:
                lps = token_logprobs(rows[[p - start - 1 for p in targets]], [seq.token_ids[p] for p in targets],
                                     k or 0, self.mask_token_id)
                seq.prompt_lps.update(zip(targets, lps))
        done = seq.num_computed_tokens + len(req.token_ids) == seq.prefill_target
        if not (done and seq.sample_after_prefill):
            return Outcome([], num_kv_kept=len(req.token_ids))
        seq.sample_after_prefill = False
        chosen = choose_next(rows[-1:], seq, self.mask_token_id)
        return emit_tokens(chosen, rows[-1:], seq,
                           self.decoder_ctx, num_kv_kept=len(req.token_ids))

    @staticmethod
    def _add_to_stats(stats: StepStats, outcome: Outcome) -> None:
        """Sum the decoder's counters and collect its observations, whatever they are called."""
        for name, amount in outcome.counters.items():
            stats.counters[name] = stats.counters.get(name, 0) + amount
        for name, value in outcome.observations.items():
            stats.observations.setdefault(name, []).append(value)

    def _apply_outcome(self, seq: Sequence, req: ForwardRequest, outcome: Outcome) -> RequestOutput | None:
        """Make `outcome` of `req` part of `seq`: commit its K/V (causal forwards only), emit its tokens up to a
        stop or the length limit, and finish the request there; the RequestOutput says what changed (None when
        nothing did)."""
        if req.forward.causal:
            # cached blocks are shared across modes because committed K/V always comes from the base weights
            assert not req.key.draft_lora, "a causal forward with the draft LoRA would commit adapter K/V"
            self.scheduler.commit_kv(seq, outcome.num_kv_kept)
        emitted: list[int] = []
        first_output = seq.num_output_tokens == 0
        for tok in outcome.new_token_ids:
            assert tok != self.mask_token_id, "the mask id must never be emitted"
            seq.token_ids.append(tok)
            emitted.append(tok)
            if tok in seq.stop_ids:
                seq.finish_reason = "stop"
                seq.stop_reason = tok if tok in seq.params.stop_token_ids else None
            elif seq.num_output_tokens >= seq.params.max_tokens or len(seq.token_ids) >= self.max_model_len:
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                break
        self.scheduler.cache_committed(seq)  # before a finish frees them: the next turn of a chat may reuse them
        if seq.finish_reason is not None:
            self.seqs.pop(seq.request_id, None)
            self.scheduler.remove(seq)
        if not emitted and seq.finish_reason is None:
            return None
        assert seq.params.mode is not None
        lps = None if outcome.logprobs is None else outcome.logprobs[:len(emitted)]
        prompt_lps = None
        if first_output and emitted and seq.params.prompt_logprobs is not None:
            prompt_lps = [None] + [seq.prompt_lps[p] for p in range(1, seq.num_prompt_tokens)]
            seq.prompt_lps = {}
        decoded = DECODERS[seq.params.mode].describe(seq) if seq.finish_reason is not None else None
        return RequestOutput(seq.request_id, emitted, seq.finish_reason, seq.stop_reason, seq.num_prompt_tokens,
                             seq.num_output_tokens, seq.num_forwards, seq.num_decode_forwards, seq.params.mode, lps,
                             prompt_lps, decoded, seq.num_cached_tokens or 0)

    # ---- introspection --------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.scheduler.blocks.usage

    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.blocks.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.scheduler.blocks.num_blocks

    def reset_prefix_cache(self) -> int:
        """Forget every cached KV block (blocks in use stay with their sequences); how many were forgotten."""
        dropped = self.scheduler.blocks.reset()
        log.info("prefix cache reset: %d cached blocks forgotten", dropped)
        return dropped

    def check_kv_invariants(self) -> None:
        """AssertionError unless the KV pool's counts are exact against the live sequences (tests, debugging)."""
        self.scheduler.blocks.check_invariants([*self.scheduler.running, *self.scheduler.waiting])

    def probe(self) -> None:
        """Readiness: a real one-token forward; raises if the model is broken."""
        self.runner.probe()

    def exit_when_a_worker_dies(self) -> None:
        """End this process (exit code 1) as soon as a tensor-parallel worker dies, even while idle: for an engine
        that runs in a process of its own (server/engine_process.py), whose death the server handles. Without
        workers, nothing to watch."""
        if self.runner.peers is not None:
            def lost(reason: str) -> None:
                log.error("%s: the engine process exits", reason)
                logging.shutdown()
                os._exit(1)

            self.runner.peers.watch(lost)

    def close(self) -> None:
        """Release what outlives the object on its own: the tensor-parallel workers (none without them)."""
        self.runner.close()

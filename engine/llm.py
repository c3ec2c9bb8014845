"""Offline API in vLLM's style: `LLM(model=None).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sequence import Logprob, SamplingParams


@dataclass
class CompletionOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # output ids, stop token included when it ended the request
    text: str
    finish_reason: str
    stop_reason: int | None
    mode: str
    num_forwards: int  # every forward the request took part in, prefill included
    num_decode_forwards: int  # forwards after prefill
    logprobs: list[Logprob] | None = field(default=None)  # one per output token when params.logprobs is set
    prompt_logprobs: list[Logprob | None] | None = None  # one per prompt token (the first None), when asked for

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / max(self.num_decode_forwards, 1)


class LLM:
    """Load a checkpoint (the built-in model when `model` is None) and generate in batches."""

    def __init__(self, model: str | None = None, **engine_kwargs) -> None:
        self.engine = Engine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[CompletionOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"params: got {len(params_list)} for {len(prompts)} prompts")
        ids: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("this checkpoint has no tokenizer: pass token ids")
                ids.append(self.tokenizer.encode(p))
            else:
                ids.append(list(p))
        rids = [f"offline-{next(self._ids)}" for _ in ids]
        index = {r: i for i, r in enumerate(rids)}
        for rid, prompt, sp in zip(rids, ids, params_list):
            self.engine.add_request(rid, prompt, sp)
        done: dict[str, CompletionOutput] = {}
        outs: dict[str, list[int]] = {r: [] for r in rids}
        lps: dict[str, list[Logprob]] = {}
        prompt_lps: dict[str, list[Logprob | None]] = {}
        while len(done) < len(rids):
            for o in self.engine.step():
                outs[o.request_id] += o.new_token_ids
                if o.logprobs is not None:
                    lps.setdefault(o.request_id, []).extend(o.logprobs)
                if o.prompt_logprobs is not None:
                    prompt_lps[o.request_id] = o.prompt_logprobs
                if o.finished:
                    i = index[o.request_id]
                    text = self.tokenizer.decode(outs[o.request_id], skip_special_tokens=True) \
                        if self.tokenizer is not None else ""
                    done[o.request_id] = CompletionOutput(
                        ids[i], outs[o.request_id], text, o.finish_reason or "", o.stop_reason, o.mode,
                        o.num_forwards, o.num_decode_forwards,
                        lps.get(o.request_id, []) if params_list[i].logprobs is not None else None,
                        prompt_lps.get(o.request_id))
        return [done[r] for r in rids]

"""KV admission: what a request's sequences may hold of the engine's KV pool, against what the server admits.

Each sequence is priced at its peak (`RequestPolicy.kv_pages`: prompt + max_tokens in whole pages, diffusion's
last block in full). The server admits requests while the summed price of everything admitted stays within
`max_queued_kv_factor` x the pool. At the default factor 1 all admitted sequences fit in the pool at their peaks
at once, so none is ever preempted (preemption recomputes a sequence from scratch, and under load it cascades:
an 8-token request once waited 40 s through 20 of them); a request beyond the bound waits in the client as a 503
with Retry-After instead. A request priced above the bound by itself could never be admitted: it is a 400.
"""

from __future__ import annotations

from engine.errors import InvalidParam
from engine.policy import RequestPolicy
from engine.sequence import SamplingParams


def bound_pages(policy: RequestPolicy, factor: float) -> int:
    """The most KV pages the admitted requests may hold at their peaks, together."""
    return int(factor * policy.kv_num_pages)


def request_pages(policy: RequestPolicy, prompts: list[tuple[list[int], SamplingParams]]) -> int:
    """The peak KV pages of all of a request's sequences (`params` resolved)."""
    return sum(policy.kv_pages(len(ids), params) for ids, params in prompts)


def never_fits(policy: RequestPolicy, factor: float,
               prompts: list[tuple[list[int], SamplingParams]]) -> InvalidParam | None:
    """Why this request can never be admitted (a 400 naming the field), or None when it can."""
    pages, bound = request_pages(policy, prompts), bound_pages(policy, factor)
    if pages <= bound:
        return None
    page = policy.kv_page_size
    seqs = len(prompts)
    # the prompts alone (one output token each) over the bound: no max_tokens helps, the input is too large
    prompt_pages = sum(-(-(len(ids) + 1) // page) for ids, _ in prompts)
    where = (f"more than the {bound} pages this server admits at once (max_queued_kv_factor {factor:g} x a "
             f"{policy.kv_num_pages}-page KV pool of {page}-token pages)")
    if prompt_pages > bound:
        tokens = sum(len(ids) for ids, _ in prompts)
        return InvalidParam("prompt", f"prompt tokens of this request ({tokens} over {seqs} sequence(s), counting "
                            f"n) need {prompt_pages} KV pages even for one output token each, {where}; send fewer "
                            f"prompts, a smaller n or shorter prompts")
    max_tokens = max(params.max_tokens for _, params in prompts)
    whole = ", in whole diffusion blocks," if any(params.mode == "diffusion" for _, params in prompts) else ""
    return InvalidParam("max_tokens", f"max_tokens {max_tokens} needs up to {pages} KV pages over the {seqs} "
                        f"sequence(s) of this request (prompt + max_tokens{whole} per sequence, counting n), "
                        f"{where}; lower max_tokens or n")

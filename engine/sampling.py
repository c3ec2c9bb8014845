"""Token choice from logits: greedy, temperature / top-k / top-p sampling, the diffusion pick, and the two
lossless ways a self-speculation round turns a verify forward into tokens at T > 0.

The mask id is excluded from every choice (SGLang does the same; the HF reference does not, and a denoise step
whose argmax is the mask makes no progress). Seeded requests draw from their own `torch.Generator`, so a seeded
request's tokens do not depend on what else is in the batch.

Speculative sampling (`speculative_verify`, Leviathan et al. 2023, Chen et al. 2023) keeps draft d_i with
probability min(1, p_i(d_i) / q_i(d_i)), samples the first rejected position from norm(max(0, p_i - q_i)) and, when
every draft is kept, the bonus from p; the emitted tokens then follow p exactly. Keyed sampling (`keyed_gumbel`,
`keyed_pick`) is the alternative that makes a token a function of (seed, position, distribution) alone: the
argmax of log p plus Gumbel noise drawn from a generator seeded by the request's seed and the token's absolute
position, so a draft perturbed by the same noise equals the verify's pick more often than chance, and the output
does not depend on which forwards produced it.
"""

from __future__ import annotations

import torch

from engine.sequence import Logprob, SamplingParams


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim, first index on ties; `max(-1).indices` is argmax's contract at 20 % less CPU time
    on fp32 vocabulary rows (49k columns: 80 vs 100 us per row on the CI machine)."""
    return logits.max(-1).indices


def exclude(logits: torch.Tensor, mask_id: int | None) -> torch.Tensor:
    """fp32 logits [N, V] with the mask id made impossible (a copy when there is a mask id; never mutated later)."""
    logits = logits.float()
    if mask_id is not None:
        logits = logits.clone()
        logits[:, mask_id] = float("-inf")
    return logits


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    # logits [N, V] already divided by the temperature; min_p first, as vLLM
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        drop = cum - probs > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams, mask_id: int | None) -> torch.Tensor:
    """The distribution `sample` draws each row from at T > 0 ([N, V] fp32): softmax of the tempered logits after
    min_p / top-k / top-p, the mask id excluded."""
    assert params.temperature > 0
    return _filter(exclude(logits, mask_id) / params.temperature, params).softmax(-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           mask_id: int | None) -> list[int]:
    """One token per row of logits [N, V] (AR semantics: multinomial over softmax(logits / T))."""
    logits = exclude(logits, mask_id)
    if params.temperature == 0:
        return greedy(logits).tolist()
    probs = _filter(logits / params.temperature, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).tolist()


def token_logprobs(logits: torch.Tensor, tokens: list[int], num_top: int, mask_id: int | None) -> list[Logprob]:
    """Per row of logits [N, V]: the logprob of tokens[i] and the `num_top` most likely (id, logprob)."""
    logp = exclude(logits, mask_id).log_softmax(-1)
    chosen_t = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])
    ranks = ((logp > chosen_t).sum(-1) + 1).tolist()
    chosen = chosen_t.squeeze(-1).tolist()
    if num_top == 0:
        return [Logprob(lp, (), r) for lp, r in zip(chosen, ranks)]
    top = torch.topk(logp, min(num_top, logp.shape[-1]), dim=-1)
    return [Logprob(lp, tuple(zip(ids, vals)), r) for lp, ids, vals, r in zip(chosen, top.indices.tolist(),
                                                                               top.values.tolist(), ranks)]


def denoise_pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                 mask_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion proposal per row: x0 and its untempered softmax confidence, as the reference.

    At T > 0 the reference takes the argmax of Gumbel-perturbed logits in float64; argmax(l / T + g) with
    g ~ Gumbel(0, 1) is the same draw, with top-k / top-p applied first when the request sets them.
    """
    logits = exclude(logits, mask_id)
    if params.temperature == 0:
        x0 = greedy(logits)
    else:
        scaled = _filter(logits.double() / params.temperature, params)
        u = torch.rand(scaled.shape, dtype=torch.float64, generator=generator).clamp_(1e-20, 1.0)
        x0 = (scaled - torch.log(-torch.log(u))).argmax(-1)
    conf = logits.softmax(-1).gather(-1, x0[:, None]).squeeze(-1)
    return x0, conf


def speculative_verify(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                       generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative sampling of one round: (number of drafts kept, the token that follows them).

    `p` [k + 1, V]: the target distributions, row i for the position of draft i + 1 (row k: the bonus);
    `drafts` d_1 .. d_k; `q` [k, V]: the distributions the drafts were drawn from, independently of each other
    (a one-shot draft), or None for drafts chosen deterministically (a one-hot q: keep d_i with probability
    p_i(d_i), residual = p_i without d_i). Consumes k uniforms and one categorical draw from `generator`.
    """
    k = len(drafts)
    c = k
    if k:
        d = torch.tensor(drafts, dtype=torch.long)[:, None]
        p_d = p[:k].gather(1, d).squeeze(1).double()
        q_d = torch.ones_like(p_d) if q is None else q.gather(1, d).squeeze(1).double()
        u = torch.rand(k, generator=generator, dtype=torch.float64)
        rejected = (u * q_d >= p_d).nonzero()  # u < p/q keeps d_i with probability min(1, p/q); q_d > 0 here
        if len(rejected):
            c = int(rejected[0, 0])
    if c == k:
        row = p[k]
    else:
        target = p[c].double()
        if q is None:
            row = target.clone()
            row[drafts[c]] = 0.0
        else:
            row = (target - q[c].double()).clamp_min(0.0)
        if not float(row.sum()) > 0.0:  # p == q up to rounding, where a rejection has probability ~0: p itself
            row = target
    return c, int(torch.multinomial(row, 1, generator=generator))


_MASK64 = (1 << 64) - 1


def _mix(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): independent-looking generator seeds for neighbouring positions."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def keyed_gumbel(seed: int, positions: list[int], vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [len(positions), vocab], each row a function of (seed, absolute position) only; drawn in
    fp64 and kept in fp32 (every caller adds the same fp32 rows, so a position's pick is the same in any path)."""
    rows = []
    for pos in positions:
        g = torch.Generator().manual_seed(_mix(seed, pos))
        u = torch.rand(vocab, generator=g, dtype=torch.float64).clamp_(1e-300, 1.0)
        rows.append((-torch.log(-torch.log(u))).float())
    return torch.stack(rows) if rows else torch.empty(0, vocab)


def keyed_pick(logits: torch.Tensor, params: SamplingParams, mask_id: int | None,
               gumbel: torch.Tensor) -> torch.Tensor:
    """Per row: argmax(log p + g), a draw from p = `probabilities(logits)` determined by the noise row g."""
    scores = _filter(exclude(logits, mask_id).double() / params.temperature, params)
    return (scores + gumbel).argmax(-1)

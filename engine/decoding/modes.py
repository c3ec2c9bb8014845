"""The decoding modes' names, and the names of what their decoders count. Torch-free: the config, the request
types and the server's metrics import it without loading the decoders.

`engine.decoding.registry` checks at import that it has exactly one decoder for each name here, in this order.
"""

from __future__ import annotations

MODES = ("ar", "diffusion", "self_spec", "auto")
# what `auto` may choose per iteration: the two modes that emit exactly the AR distribution (diffusion's output is
# its own, so choosing it would change what a request returns)
AUTO_CHOICES = ("ar", "self_spec")

# Counters a decoder reports in `Outcome.counters`; the engine sums them per step into `StepStats.counters`.
SPEC_DRAFTS = "spec_drafts"  # self_spec: draft/verify iterations
SPEC_DRAFT_TOKENS = "spec_draft_tokens"  # self_spec: drafted tokens checked by a verify
SPEC_ACCEPTED_TOKENS = "spec_accepted_tokens"  # self_spec: drafts accepted, the bonus token excluded (as vLLM)
GRAMMAR_FORCED_TOKENS = "grammar_forced_tokens"  # tokens a grammar forced, emitted without a draft (jump-forward)
AUTO_ITERATIONS = {c: f"auto_iterations_{c}" for c in AUTO_CHOICES}  # auto: iterations decoded as each choice

# Observations (one value each, for a histogram) in `Outcome.observations`, collected into `StepStats.observations`.
DENOISE_STEPS_PER_BLOCK = "denoise_steps_per_block"  # diffusion: denoise forwards a block took to resolve

COUNTERS = (SPEC_DRAFTS, SPEC_DRAFT_TOKENS, SPEC_ACCEPTED_TOKENS,  # every counter name a decoder may report
            GRAMMAR_FORCED_TOKENS, *AUTO_ITERATIONS.values())
OBSERVATIONS = (DENOISE_STEPS_PER_BLOCK,)  # every observation name a decoder may report

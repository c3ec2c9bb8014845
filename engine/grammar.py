"""Grammar-constrained decoding over token ids with xgrammar: compiling a `GrammarSpec` (`GrammarCompilerCache`)
and the per-sequence logits processor that masks every choice point (`GrammarProcessor`).

The processor plugs into `engine.logits_processing` like any other control: row i of a call comes after the
sequence's output tokens followed by `prefixes[i]` (a self_spec verify row after drafts d_1 .. d_i, a denoise row
after the block's tokens to its left). Its matcher follows the emitted output lazily (it catches up on the tokens
emitted since the last call) and stands on a speculative path past it: for each row it rolls the path back to where
it parts from the row's prefix, accepts the rest and fills the token bitmask. The path stays between calls, so a
draft chosen row by row, the verify of that draft and the tokens the round emits are each accepted once, and
emitted tokens already on the path are not accepted again. `allows` answers for one token without a bitmask, which
is all a greedy choice needs when the model's own pick is grammatical (`engine.logits_processing.greedy_chain`).
A row whose prefix the
grammar refuses is left as it is: no decoder uses a row that comes after a refused token (a verify stops at the
first draft that differs from the row before it, and a refused draft always differs).

Forced tokens (jump-forward). Where the grammar admits one continuation only (the `", "name": "` between two JSON
fields), xgrammar's `find_jump_forward_tokens` spells it in the vocabulary's longest tokens, leaving out a last
token that a longer one could extend. The mask of such a row keeps its first token alone, though the grammar would
take other spellings of the same text (`"` then `n`, or `"n`): so the forced text has one tokenization, and the
decoders may emit it without asking the model (`forced_tokens`; `ar` and `self_spec` do, see their modules) and
still emit what a token-by-token walk under these masks would. The text is the grammar's either way; what changes
is which of its spellings the model conditions on, and the one chosen is the vocabulary's own longest-first one. A
forced token that another control bans (a bad word) leaves its row the grammar's full mask, as if nothing were
forced there.

EOS is a token like any other here: the grammar allows the stop ids only where it can end, and only them once it
is complete, so an output that finishes with `stop` parses. Once the matcher has accepted a stop id it is
terminated and later rows (tokens that the engine cuts anyway) are left unmasked.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence as Seq
from typing import Any

import torch

from engine.errors import InvalidParam
from engine.logits_processing import LogitsPipeline
from engine.sequence import Sequence
from engine.structured import GrammarSpec

log = logging.getLogger("trimode.engine")


def _xgr() -> Any:
    import xgrammar  # imported on first use: plain requests never load it

    return xgrammar


def choice_grammar(choices: Seq[str]) -> str:
    """EBNF whose language is exactly `choices` (vLLM's `choice`)."""
    # JSON string escapes (\" \\ \n \uXXXX) are EBNF string escapes too
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompilerCache:
    """xgrammar compilation for one tokenizer and vocabulary, with an LRU of compiled grammars keyed by the spec.

    Thread-safe: the server compiles in worker threads. `compile` raises InvalidParam naming the spec's field when
    the schema, regex or grammar is invalid."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Seq[int] | None = None,
                 max_entries: int = 256) -> None:
        xgr = _xgr()
        stop = list(stop_token_ids) if stop_token_ids else None
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.hits = self.misses = 0

    def _lookup(self, key: tuple[str, str]) -> Any:
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                self.hits += 1
            return found

    def _store(self, key: tuple[str, str], compiled: Any) -> None:
        with self._lock:
            self.misses += 1
            self._cache[key] = compiled
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)

    def compile(self, spec: GrammarSpec) -> Any:
        """The xgrammar CompiledGrammar of `spec` (cached)."""
        found = self._lookup(spec.key)
        if found is not None:
            return found
        c = self._compiler
        try:
            if spec.kind == "json":
                compiled = c.compile_json_schema(spec.source, any_whitespace=False)
            elif spec.kind == "json_object":
                compiled = c.compile_builtin_json_grammar()
            elif spec.kind == "regex":
                compiled = c.compile_regex(spec.source)
            elif spec.kind == "choice":
                compiled = c.compile_grammar(choice_grammar(json.loads(spec.source)))
            else:
                compiled = c.compile_grammar(spec.source)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidParam(spec.field, f"invalid {spec.field}: {_short(exc)}") from None
        self._store(spec.key, compiled)
        return compiled

    def load(self, spec: GrammarSpec) -> Any:
        """The CompiledGrammar for `spec` in the engine: deserialized from the server's compile when it shipped
        one (cached by the spec), else compiled here."""
        found = self._lookup(spec.key)
        if found is not None:
            return found
        if spec.compiled is None:
            return self.compile(spec)
        compiled = _xgr().CompiledGrammar.deserialize_json(spec.compiled, self.info)
        self._store(spec.key, compiled)
        return compiled

    def serialized(self, spec: GrammarSpec) -> str:
        return self.compile(spec).serialize_json()


def _short(exc: BaseException) -> str:
    # xgrammar's messages start with "[hh:mm:ss] /project/cpp/file.cc:123: "; the client needs the rest
    text = str(exc).strip()
    if text.startswith("[") and ": " in text:
        rest = text.split("] ", 1)[-1]
        parts = rest.split(": ", 1)
        if len(parts) == 2 and (".cc:" in parts[0] or ".h:" in parts[0]):
            text = parts[1]
    return text.splitlines()[0][:300] if text else type(exc).__name__


class GrammarProcessor:
    """The logits processor of one constrained sequence (see the module docstring)."""

    needs_order = True  # diffusion commits a constrained block left to right (engine.logits_processing)
    can_empty = False  # a row its bitmask would empty is left unmasked (below): it never empties a row itself

    def __init__(self, compiled: Any, vocab_size: int, stop_token_ids: Seq[int]) -> None:
        xgr = _xgr()
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids) or None)
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # grown to the widest call, reused by each call
        self.consumed = 0  # output tokens the matcher has accepted
        # tokens accepted past the committed output, kept between calls: a draft's rows, then its verify's, then
        # the tokens the round emits walk one path, so each is accepted once (rolled back only where they part)
        self.path: list[int] = []
        self.broken = False  # an emitted token was refused (cannot happen through the masks; logged once)

    # ---- following the committed output ----
    def sync(self, seq: Sequence) -> None:
        """Accept the output tokens emitted since the last call (those already on the path are kept as they are)."""
        out = seq.token_ids[seq.num_prompt_tokens + self.consumed:]
        if not out:
            return
        self.consumed += len(out)
        path = self.path
        m = _common_prefix(path, out)
        del path[:m]  # committed now: the matcher already stands past them
        if m == len(out):
            return
        if path:
            self.matcher.rollback(len(path))
            path.clear()
        for tok in out[m:]:
            if self.broken or self.matcher.is_terminated():
                break
            if not self.matcher.accept_token(int(tok)):
                self.broken = True
                log.warning("request %s: emitted token %d is outside its grammar", seq.request_id, tok)

    # ---- the speculative path ----
    def _advance(self, tokens: Seq[int]) -> int:
        """Accept `tokens` in order until one is refused or the matcher ends; returns how many were accepted."""
        n = 0
        for t in tokens:
            if self.matcher.is_terminated() or not self.matcher.accept_token(int(t)):
                break
            n += 1
        return n

    def _goto(self, prefix: Seq[int]) -> bool:
        """Stand the matcher after `prefix` (following the committed output): roll the path back to where it
        parts from `prefix`, accept the rest. True when the grammar takes the whole prefix and has not ended, i.e.
        the row after it is masked."""
        path = self.path
        common = _common_prefix(path, prefix)
        if common < len(path):
            self.matcher.rollback(len(path) - common)
            del path[common:]
        rest = prefix[common:]
        accepted = self._advance(rest)
        path.extend(int(t) for t in rest[:accepted])
        return accepted == len(rest) and not self.matcher.is_terminated()

    # ---- masks ----
    def _rows(self, n: int) -> torch.Tensor:
        """The first `n` rows of the sequence's reusable bitmask buffer (grown on demand, never shrunk)."""
        if self.bitmask.shape[0] < n:
            self.bitmask = self._xgr.allocate_token_bitmask(n, self.vocab_size)
        return self.bitmask[:n]

    def _forced(self) -> list[int]:
        """The tokens the grammar forces from the matcher's state (xgrammar's jump-forward tokens), [] where it
        forces nothing; the string check first, as it costs a tenth of the tokens' (0.4 against 2.5 us unforced)."""
        if not self.matcher.find_jump_forward_string():
            return []
        return self.matcher.find_jump_forward_tokens()

    def forced(self, seq: Sequence) -> list[int]:
        """The tokens the grammar forces after the output, in xgrammar's tokenization of the forced text ([] where
        it forces nothing or has ended)."""
        self.sync(seq)
        if self.broken or not self._goto(()):
            return []
        return self._forced()

    def _one_hot(self, bitmask: torch.Tensor, i: int, token: int) -> None:
        row = bitmask[i]
        row.zero_()
        bit = 1 << (token % 32)
        row[token // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit  # int32 words

    def __call__(self, logits: torch.Tensor, seq: Sequence, prefixes: Seq[tuple[int, ...]]) -> torch.Tensor:
        self.sync(seq)
        if self.broken:  # (not is_terminated(): that is the path's state, and _goto finds the committed one's)
            return logits
        bitmask = self._rows(len(prefixes))
        filled: list[int] = []  # rows whose prefix the grammar takes, before it ends: their bitmask rows are filled
        for i, prefix in enumerate(prefixes):
            if self._goto(prefix):
                forced = self._forced()
                if forced and bool(torch.isfinite(logits[i, forced[0]])):
                    self._one_hot(bitmask, i, forced[0])
                else:  # (a forced token another control bans: the grammar's full mask, as if nothing were forced)
                    self.matcher.fill_next_token_bitmask(bitmask, i)
                filled.append(i)
        if not filled:
            return logits
        # one emptiness check and one masking pass over every filled row, not a call (and a copy) per row
        nonempty = bitmask[filled].ne(0).any(-1).tolist()
        if not all(nonempty):
            # the vocabulary cannot continue the grammar there (e.g. it lacks a character the grammar needs): the
            # row stays as it is rather than all -inf (NaN under sampling), and the request is unconstrained now
            self.broken = True
            log.warning("request %s: no token of the vocabulary continues its grammar", seq.request_id)
            filled = [i for i, ok in zip(filled, nonempty, strict=True) if ok]
            if not filled:
                return logits
        self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size,
                                              indices=filled)
        return logits

    def allows(self, seq: Sequence, prefix: Seq[int], token: int) -> bool:
        """Whether the row after `prefix` keeps `token` under this processor's mask, i.e. the grammar takes `token`
        there (or that row is not masked at all: the prefix is refused or the grammar has ended). A yes puts
        `token` on the path, so the next row, after `prefix + token`, costs no rollback."""
        self.sync(seq)
        if self.broken:
            return True
        n = len(prefix)
        path = self.path
        if len(path) > n and path[n] == token and path[:n] == list(prefix):
            return True  # the path took it there already
        if not self._goto(prefix):
            return True
        forced = self._forced()
        if forced and forced[0] != token:
            return False  # (`best` gives the forced token, or the full mask's pick where another control bans it)
        if self.matcher.accept_token(int(token)):
            path.append(int(token))
            return True
        return False

    def best(self, seq: Sequence, prefix: Seq[int], row: torch.Tensor) -> int | None:
        """The argmax of `row` [V] (the other controls applied) under the mask of the row after `prefix`; None when
        that row is not masked or its mask is empty (the caller then runs the full pipeline, fallbacks and all)."""
        self.sync(seq)
        if self.broken or not self._goto(prefix):
            return None
        forced = self._forced()
        if forced and bool(torch.isfinite(row[forced[0]])):
            return forced[0]
        bitmask = self._rows(1)
        self.matcher.fill_next_token_bitmask(bitmask, 0)
        masked = row[None].clone()
        self._xgr.apply_token_bitmask_inplace(masked, bitmask.to(row.device), vocab_size=self.vocab_size)
        best = masked.max(-1)
        return int(best.indices) if bool(torch.isfinite(best.values)) else None

    def first_refused(self, seq: Sequence, tokens: Seq[int]) -> int:
        """Index of the first of `tokens` (following the output so far) that the grammar refuses, or comes after
        the grammar has ended; len(tokens) when it takes them all. Leaves the matcher on the path of the ones it
        took."""
        self.sync(seq)
        if self.broken:
            return len(tokens)
        self._goto(tokens)  # stops at a refused token and after a stop id
        return len(self.path)  # the path is now the part of `tokens` the grammar took


def _common_prefix(a: Seq[int], b: Seq[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def grammar_of(seq: Sequence) -> GrammarProcessor | None:
    """The sequence's grammar processor, when its request is constrained."""
    pipe = seq.logits_pipeline
    if pipe is None:
        return None
    return next((p for p in pipe.processors if isinstance(p, GrammarProcessor)), None)


def forced_tokens(seq: Sequence, limit: int) -> list[int]:
    """Up to `limit` tokens that come next whatever the model says: those the sequence's grammar forces after its
    output (`GrammarProcessor.forced`), cut at the first that its other controls ban (bad words, allowed tokens,
    min_tokens' hold on a stop id) after the ones before it: that row then keeps the grammar's full mask, so its
    token is the model's. [] for an unconstrained sequence."""
    grammar = grammar_of(seq)
    if grammar is None or limit <= 0:
        return []
    forced = grammar.forced(seq)[:limit]
    assert seq.logits_pipeline is not None
    banning = [p for p in seq.logits_pipeline.processors if p is not grammar and getattr(p, "can_empty", True)]
    if forced and banning:
        # a banning control sets -inf whatever the logits, so a row of zeros shows what it bans
        rows = torch.zeros(len(forced), grammar.vocab_size)
        for proc in banning:
            rows = proc(rows, seq, [tuple(forced[:i]) for i in range(len(forced))])
        kept = torch.isfinite(rows[torch.arange(len(forced)), torch.tensor(forced)]).tolist()
        forced = forced[:kept.index(False)] if False in kept else forced
    return forced


_CACHES: weakref.WeakKeyDictionary[Any, GrammarCompilerCache] = weakref.WeakKeyDictionary()


def attach_grammar(seq: Sequence, tokenizer: Any, vocab_size: int, stop_token_ids: Seq[int]) -> None:
    """Give a constrained sequence (`seq.params.structured` set) its GrammarProcessor, last in its pipeline (after
    the other controls, so a grammar-allowed token is what is left). The compiled grammar comes deserialized from
    the server's compile, cached per tokenizer by the spec."""
    spec = seq.params.structured
    assert spec is not None
    if tokenizer is None:
        raise InvalidParam(spec.field, f"{spec.field} needs the model's tokenizer, and this model ships none")
    cache = _CACHES.get(tokenizer)
    if cache is None or cache.vocab_size != vocab_size:
        cache = _CACHES[tokenizer] = GrammarCompilerCache(tokenizer, vocab_size)  # as the server's compile
    proc = GrammarProcessor(cache.load(spec), vocab_size, stop_token_ids)
    if seq.logits_pipeline is None:
        seq.logits_pipeline = LogitsPipeline([proc])
    else:
        seq.logits_pipeline.processors.append(proc)

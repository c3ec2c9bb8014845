"""DECODERS: the decoder that serves each mode, keyed by the names in `engine.decoding.modes`."""

from __future__ import annotations

from engine.decoding.ar import AR
from engine.decoding.auto import AutoDecoder
from engine.decoding.base import Decoder
from engine.decoding.diffusion import BlockDiffusion
from engine.decoding.modes import MODES
from engine.decoding.spec import SelfSpec

DECODERS: dict[str, Decoder] = {"ar": AR(), "diffusion": BlockDiffusion(), "self_spec": SelfSpec(),
                                "auto": AutoDecoder()}

# the torch-free name list and this table must agree, or requests could name a mode no decoder serves
if tuple(DECODERS) != MODES:
    raise ImportError(f"engine.decoding.modes.MODES {MODES} != the registry's decoders {tuple(DECODERS)}")

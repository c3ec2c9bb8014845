"""Decoding modes as per-sequence strategies over causal and bidirectional forwards.

`modes` names the modes and their counters (torch-free); `base` holds the decoder interface and the `Outcome` a
decoder returns; `ar`, `diffusion` and `spec` are the decoders; `registry` maps each mode to its decoder. Nothing
is imported here, so that `engine.decoding.modes` stays torch-free.
"""

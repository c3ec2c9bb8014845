"""Training code for the built-in `trimode-tiny` checkpoint (corpus, tokenizer, base training, distillation, eval).

Kept apart from the serving code; it reuses `engine.model.TriModeModel` so the checkpoint format cannot drift.
"""

"""trimode's engine: tri-mode model, paged KV cache, scheduler and decoders. Speaks token ids only."""

"""trimode's OpenAI-compatible HTTP server (speaks text; the engine speaks token ids)."""

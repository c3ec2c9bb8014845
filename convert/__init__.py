"""Checkpoint converters, beside the runtime: `convert.gguf` turns a GGUF file into a Hugging Face directory."""

"""trimode's OpenAI-compatible HTTP server: FastAPI in front of one engine (in its own process, or a thread).

Imports engine, never torch."""

__version__ = "0.1.0"

"""The checkpoint's tokenizer and chat template, loaded offline through transformers."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("trimode.engine")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path):
    """AutoTokenizer from `path` with no network access; None when the directory ships no tokenizer."""
    path = Path(path)
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        log.warning("%s has no tokenizer files (%s): the engine will accept token ids only",
                    path, ", ".join(TOKENIZER_FILES))
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)

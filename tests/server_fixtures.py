"""Server test helpers: a tiny char-level tokenizer with a ChatML template, and a live server in a thread (bare
uvicorn, or the trimode server as `trimode serve` runs it).

The tokenizer has one token per character (ids 0..95, matching the tiny checkpoints' vocabulary) with
2 = EOS and 3 = MASK reserved, so every id the random model emits decodes to something.
"""

from __future__ import annotations

import socket
import string
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.config import ServerConfig

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<mask>", "<|im_start|>", "<|im_end|>"]


def write_char_tokenizer(path: Path, vocab_size: int = 96) -> Path:
    """Write tokenizer.json + tokenizer_config.json (one token per character) so AutoTokenizer loads it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # JSON's punctuation and `<tool_call>`'s come before the rarer symbols: the vocabulary ends at 96 ids
    chars = " \n" + string.ascii_letters + string.digits + ".,!?'-:;()\"{}[]_#$%&*+/<=>@|~"
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in chars:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", mask_token="<mask>",
        additional_special_tokens=SPECIALS[4:])
    fast.chat_template = CHATML
    fast.save_pretrained(str(path))
    return path


def write_served_checkpoint(path: Path) -> Path:
    """A tiny random tri-mode checkpoint (with a draft LoRA) plus the char tokenizer: what a live server needs."""
    from tests.checkpoints import write_nld_checkpoint

    write_nld_checkpoint(path, lora_rank=4)
    return write_char_tokenizer(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, url: str, timeout: float = 600.0) -> None:
    """Poll `url`/health until it answers 200; fails if the server process exits or `timeout` passes first.

    `timeout` only guards against a hang: a start takes seconds alone and can take over a minute on a loaded
    2-core machine (one took 90 s with four other test runs beside it), so it is set where only a hang reaches it."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)


@contextmanager
def running(server, timeout: float = 30.0) -> Iterator[threading.Thread]:
    """Run a uvicorn.Server (or subclass) in a daemon thread (yielded) until the block ends; then ask it to exit
    and join it."""
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield thread
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def live_server(app, port: int | None = None, config: ServerConfig | None = None) -> Iterator[str]:
    """Run `app` on uvicorn in a daemon thread; yields the base URL and stops the server afterwards.

    With a `config` (a ServerConfig; its host and port are replaced), `app` runs on the trimode server as
    `trimode serve` runs it (`server.drain.make_server`: the connection guards and the bounded shutdown);
    without, on bare uvicorn."""
    import uvicorn

    port = port or free_port()
    if config is None:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="on"))
    else:
        import dataclasses

        from server.drain import make_server

        server = make_server(app, dataclasses.replace(config, host="127.0.0.1", port=port))
    with running(server):
        yield f"http://127.0.0.1:{port}"

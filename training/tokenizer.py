"""Train the byte-level BPE tokenizer of trimode-tiny and write it in Hugging Face layout.

Special tokens take the first ids: `<unk>` 0, `<s>` 1 (BOS), `</s>` 2 (EOS, end of document), `<|mask|>` 3 (the
diffusion mask, `config.mask_token_id`), `<|im_start|>` 4, `<|im_end|>` 5 (ChatML turn end, also a stop id).
The result loads offline with `transformers.AutoTokenizer.from_pretrained(dir)`.

    python -m training.tokenizer --vocab-size 4096 --out training/runs/tokenizer
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from training.corpus import DATA_DIR, read_docs

SPECIALS = ["<unk>", "<s>", "</s>", "<|mask|>", "<|im_start|>", "<|im_end|>"]
UNK_ID, BOS_ID, EOS_ID, MASK_ID, IM_START_ID, IM_END_ID = range(6)

# ChatML; with `tools`, a Hermes-style tools section (calls as <tool_call>{json}</tool_call>, results as
# <tool_response>), which server.tool_parsers.hermes parses
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{ '# Tools\n\nYou may call one or more functions. Their signatures are within <tools></tools> tags:\n' }}"
    "{{ '<tools>\n' }}"
    "{%- for tool in tools %}{{ (tool['function'] if tool['function'] is defined else tool) | tojson }}{{ '\n' }}"
    "{%- endfor %}"
    "{{ '</tools>\n\nFor each call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\n' }}{%- if message['content'] %}{{ message['content'] + '\n' }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{{ '<tool_call>\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{ fn['arguments'] }}{%- else %}{{ fn['arguments'] | tojson }}{%- endif %}"
    "{{ '}\n</tool_call>' }}{%- if not loop.last %}{{ '\n' }}{%- endif %}"
    "{%- endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)


def train_tokenizer(vocab_size: int, data_dir: Path = DATA_DIR) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    docs = read_docs(data_dir / "train.txt")
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def save_hf(tok: Tokenizer, out: Path, model_max_length: int = 2048) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json (no BOS added by encode)."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, s in enumerate(SPECIALS)
    }
    conf = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "mask_token": "<|mask|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "</s>"],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    smap = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "</s>",
            "mask_token": "<|mask|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "</s>"]}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    tok = train_tokenizer(args.vocab_size, args.data)
    save_hf(tok, args.out)
    print(f"vocab {tok.get_vocab_size()} -> {args.out}")


if __name__ == "__main__":
    main()

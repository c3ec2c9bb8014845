"""`trimode`: the command, one subcommand per job. It owns only the dispatch (and `generate`, the offline one-shot):

- `serve`: the HTTP server (`server.cli`);
- `generate`: offline, one prompt through `engine.llm.LLM`, the text printed;
- `bench`: offline tokens/s by mode and batch size vs transformers (`bench.offline`);
- `loadtest`: load-test a running server (`loadtest.cli`).

It sits above the runtime and the tools, so `server` never imports a tool (bench, loadtest), and a tool's import
costs only its own subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import fields

from engine.decoding.modes import MODES
from server.cli import add_config_flags, add_serve_parser, overrides_from, serve
from server.config import load_config

TOOLS = {  # subcommand -> (module with main(argv) -> int, help); their own parsers read the rest of the line
    "bench": ("bench.offline", "offline tokens/s by mode and batch size vs transformers (`trimode bench --help`)"),
    "loadtest": ("loadtest.cli", "load-test a running server (python -m loadtest; see `trimode loadtest --help`)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trimode", description="Serve tri-mode diffusion LMs over an "
                                     "OpenAI-compatible API.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    gen = sub.add_parser("generate", help="offline: generate for one prompt and print the text")
    gen.add_argument("prompt")
    gen.add_argument("--config")
    gen.add_argument("--model")
    gen.add_argument("--mode", choices=list(MODES))
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--block-length", type=int)
    gen.add_argument("--threshold", type=float)
    add_config_flags(gen, ("engine",))
    for name, (_, help_text) in TOOLS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def generate(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.sequence import SamplingParams

    engine_cfg, _ = load_config(args.config, {"engine": overrides_from(args)["engine"]})
    kwargs = {f.name: getattr(engine_cfg, f.name) for f in fields(engine_cfg) if f.name != "model"}
    llm = LLM(engine_cfg.model, **kwargs)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, mode=args.mode,
                            steps=args.steps, block_length=args.block_length, threshold=args.threshold)
    out = llm.generate(args.prompt, params)[0]
    print(out.text)
    print(f"[mode={out.mode} tokens={len(out.token_ids)} forwards={out.num_decode_forwards} "
          f"finish={out.finish_reason}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return generate(args)


if __name__ == "__main__":
    raise SystemExit(main())

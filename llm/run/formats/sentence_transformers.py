"""`--to sentence-transformers`: a text embedding model as sentence-transformers' own directory
(modules.json: a Transformer module over the Hugging Face trunk, then Pooling, then Normalize for a
contrastive model), which `SentenceTransformer(OUT).encode(texts)` opens offline.

The model is an `encoder` (a bare trunk; `pooling` picks first, mean or last token, default mean) or
a `contrastive` model (its own pooling, L2-normalised as it trains). llm's pooling maps one to one:
first -> "cls", mean -> "mean" (over the attention mask), last -> "lasttoken". The trunk is written by
`llm.run.formats.hf` (so a LoRA, a uniform pruning or a quantization goes as it goes there), and the
directory by sentence-transformers itself (`SentenceTransformer.save`), so it is the layout of the
installed version.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from llm import transforms
from llm.errors import UserError
from llm.models.base import Model
from llm.run import loader
from llm.run.formats import hf, require

POOLING = {"first": "cls", "mean": "mean", "last": "lasttoken"}


def trunk(model: Model) -> Model:
    """The bare trunk (task `encoder`, with the pooler it has, unused here) of `model`, with its weights
    and transforms."""
    description = model.description()
    description["model"]["pooler"] = getattr(model, "pooler", None) is not None
    description["task"] = {"name": "encoder"}
    copy = loader.build_from_description(description, "the embedding model")
    weights = {k: v for k, v in transforms.plain_state(model).items() if k.startswith(("transformer.", "pooler."))}
    return loader.load_weights(copy, weights, "the embedding model").eval()


def check(model: Model) -> str | None:
    """Why sentence-transformers cannot hold `model`, else None."""
    if model.config.is_image:
        return "sentence-transformers embeds text here; an image model has no tokenizer"
    if model.task not in ("encoder", "contrastive"):
        return f"a {model.task} model is no embedding model (sentence-transformers holds encoder and contrastive ones)"
    reason = hf.check(trunk(model))
    return None if reason is None else f"its trunk has no Hugging Face form: {reason}"


def write(model: Model, out_dir: Path, tokenizer: Path | None = None, *, pooling: str | None = None) -> None:
    """`pooling`: first, mean or last, for an encoder (default mean); a contrastive model keeps its own.

    Raises UserError for a pooling that contradicts a contrastive model's, a missing tokenizer, or a
    missing sentence-transformers (naming its `pip install`)."""
    require("sentence_transformers", "sentence-transformers")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    own = model.options.pooling if model.task == "contrastive" else None
    if own is not None and pooling not in (None, own):
        raise UserError(f"--pooling {pooling}: the contrastive model was trained with {own} pooling")
    if tokenizer is None:
        raise UserError("sentence-transformers tokenizes the text itself: give the model's tokenizer.json")
    mode = POOLING[own or pooling or "mean"]
    cfg = model.config
    with tempfile.TemporaryDirectory(dir=out_dir) as body:
        hf.write(trunk(model), Path(body), tokenizer)
        modules = [Transformer(body, max_seq_length=cfg.max_seq_len), Pooling(cfg.d_model, mode)]
        SentenceTransformer(modules=modules + ([Normalize()] if own is not None else []), device="cpu").save(
            str(out_dir)
        )

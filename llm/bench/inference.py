"""`llm bench decode` and `llm bench classify`: what compression buys at inference, against its peers.

decode: greedy generation at batch 1 with the KV cache (tokens/s after the prompt's forward); classify: the
forward pass of a classifier over one batch (examples/s). Each runs the model in llm fp32, int8, int4 (group 32),
int8-dynamic (classify only), structurally pruned (a quarter of the heads and MLP neurons removed from every
block) and as a student of half the layers (a distilled model's shape, initialised from the first blocks), and
the same weights in the peers that are installed: transformers fp32 (a classifier pooled as its Hugging Face
architecture pools); llama.cpp (llama-cpp-python) on GGUF Q8_0 / Q4_0 and ONNX Runtime int8 (dynamic
quantization), both through `llm convert`. A peer that cannot run says why under the table. Every model runs once
per round, interleaved, so the machine's noise falls on all alike; the median of the rounds is reported.

Decode at batch 1 streams every weight of every matmul once per token, so its speed is bounded by
(bytes streamed per token) / (memory bandwidth). The bandwidth is measured here as the copy rate of a buffer
larger than the caches, counting bytes read and written (STREAM's convention), with this process's threads;
`limit` is that rate over the model's streamed bytes (matmul weights, their scales and biases; an embedding
lookup reads a few rows and is left out, a head tied to the table reads it whole). Unstructured sparsity is
not a row: zeros are stored densely and no sparse kernel runs on a CPU, so it saves no time here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from llm.bench.common import format_table, write_results

DECODE_QUANTIZED = {"llm int8": ("int8", 32), "llm int4 g32": ("int4", 32)}
CLASSIFY_QUANTIZED = {"llm int8-dynamic": ("int8-dynamic", 32), **DECODE_QUANTIZED}
# bytes per weight of the GGUF block formats: Q8_0 32 int8 + one fp16 scale, Q4_0 32 nibbles + one fp16 scale
GGUF_BYTES_PER_WEIGHT = {"q8_0": 34 / 32, "q4_0": 18 / 32}


# ----------------------------------------------------------------------------
# The machine's limit
# ----------------------------------------------------------------------------


def copy_rate(megabytes: int = 256, repeat: int = 5) -> float:
    """GB/s of copying a `megabytes` fp32 buffer (read + write, the median of `repeat` copies)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def streamed_bytes(model: nn.Module) -> int:
    """Bytes a batch-1 decode step reads: every matmul's weight (quantized: integers and scales) and bias, once
    each (a tied table once)."""
    from llm.compress.quantized import QuantizedLinear, QuantizedLMHead
    from llm.models.layers import LMHead

    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, (QuantizedLinear, QuantizedLMHead)):
            tensors = [m.weight.qweight, m.weight.scale]
        elif isinstance(m, (nn.Linear, LMHead)):
            tensors = [m.weight]
        else:
            continue
        for t in [*tensors, m.bias]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.nbytes
    return total


# ----------------------------------------------------------------------------
# llm's variants
# ----------------------------------------------------------------------------


def student(model: nn.Module) -> nn.Module:
    """The model's architecture with half its blocks, initialised from the first ones: a distilled student's
    shape (its speed does not depend on how it was trained)."""
    from llm.tasks import build_model

    cfg = dataclasses.replace(model.config, n_layers=max(1, model.config.n_layers // 2))
    small = build_model(cfg, model.description()["task"])
    small.load_state_dict(model.state_dict(), strict=False)  # the blocks beyond n_layers are left out
    return small.eval()


def variants(model: nn.Module, quantized: dict[str, tuple[str, int]]) -> dict[str, nn.Module]:
    """{row name: model}: llm fp32, the quantized methods, structurally pruned, the student."""
    from llm import transforms
    from llm.compress import prune

    models = {"llm fp32": model}
    for name, (method, group_size) in quantized.items():
        spec = {"name": "quantize", "method": method, "group_size": group_size}
        models[name] = transforms.apply_transform(copy.deepcopy(model), spec)
    cfg = model.config
    heads, neurons = max(1, cfg.kv_heads // 4), cfg.d_ff // 4
    pruned = prune.prune_structured(copy.deepcopy(model), heads, neurons)
    models[f"llm pruned (-{heads}/{cfg.kv_heads} kv heads, -{neurons}/{cfg.d_ff} neurons)"] = pruned
    models[f"llm student ({max(1, cfg.n_layers // 2)} of {cfg.n_layers} layers)"] = student(model)
    return models


# ----------------------------------------------------------------------------
# Peers: each prepares a runner from the llm model directory, or says why it cannot
# ----------------------------------------------------------------------------


class PeerMissing(Exception):
    """A peer that cannot run here; the message says why (the package to install)."""


@dataclasses.dataclass
class Peer:
    """A peer row: `prepare(model_dir, work, job)` returns a function that runs one timed call, or raises
    PeerMissing; `bytes_per_weight` (None: fp32) gives its bandwidth limit."""

    name: str
    prepare: Callable[[Path, Path, dict], Callable[[], object]]
    bytes_per_weight: float | None = None


def _need(module: str, install: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise PeerMissing(f"not installed (pip install {install})")


def _convert(model_dir: Path, out: Path, to: str, **options) -> Path:
    """`llm convert` of the model to format `to` with the format's `options` (e.g. gguf_type="q8_0")."""
    from llm.run.convert import convert

    convert(str(model_dir), str(out), to=to, **options)
    return out


def _transformers_decode(model_dir: Path, work: Path, job: dict):
    _need("transformers", "transformers")
    import transformers

    from llm.run.loader import load_model
    from llm.tasks.hf import to_hf

    hf_dir = to_hf(load_model(model_dir), work / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    n = job["new_tokens"]
    settings = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return lambda: hf.generate(job["prompt"], attention_mask=torch.ones_like(job["prompt"]), **settings)


def _transformers_classify(model_dir: Path, work: Path, job: dict):
    """transformers' sequence classifier of the family on the same weights. It pools as that architecture does
    (BERT: [CLS] through the pooler; causal bodies: the last token), so a model that llm pools otherwise (mean
    pooling has no Hugging Face architecture) is timed with the architecture's pooling: the trunk, the work that
    costs, is the same."""
    _need("transformers", "transformers")
    import transformers

    from llm.run.loader import load_model
    from llm.tasks import build_model
    from llm.tasks.hf import to_hf

    model = load_model(model_dir)
    pooled_as_hf = build_model(model.config, {**model.description()["task"], "pooling": None})
    pooled_as_hf.load_state_dict(model.state_dict())
    hf_dir = to_hf(pooled_as_hf, work / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return lambda: hf(**job["inputs"])


def _llama_cpp(gguf_type: str):
    def prepare(model_dir: Path, work: Path, job: dict):
        _need("llama_cpp", "llama-cpp-python  # compiles llama.cpp, minutes")
        gguf = _convert(model_dir, work / f"gguf-{gguf_type}", to="gguf", gguf_type=gguf_type)
        import llama_cpp

        path = next(gguf.glob("*.gguf"))
        threads = torch.get_num_threads()  # the prompt's threads too: llama-cpp-python defaults them to every core
        llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
        prompt = job["prompt"][0].tolist()

        def run():
            llm.reset()
            tokens = []
            for token in llm.generate(prompt, temp=0.0):  # greedy; llama.cpp streams one token at a time
                tokens.append(token)
                if len(tokens) == job["new_tokens"]:
                    return tokens

        return run

    return prepare


def _onnxruntime_int8(model_dir: Path, work: Path, job: dict):
    _need("onnxruntime", "onnxruntime")
    onnx_dir = _convert(model_dir, work / "onnx-int8", to="onnx", int8=True)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(next(onnx_dir.glob("*.onnx"))), options)
    # the graph of a model with segment embeddings takes token_type_ids; llm's forward defaults them to zeros
    inputs = {"token_type_ids": torch.zeros_like(job["inputs"]["input_ids"]), **job["inputs"]}
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return lambda: session.run(None, feed)


DECODE_PEERS = (
    Peer("transformers fp32", _transformers_decode),
    Peer("llama.cpp GGUF Q8_0", _llama_cpp("q8_0"), GGUF_BYTES_PER_WEIGHT["q8_0"]),
    Peer("llama.cpp GGUF Q4_0", _llama_cpp("q4_0"), GGUF_BYTES_PER_WEIGHT["q4_0"]),
)
CLASSIFY_PEERS = (
    Peer("transformers fp32", _transformers_classify),
    Peer("ONNX Runtime int8 (dynamic)", _onnxruntime_int8),
)


def prepare_peers(
    model: nn.Module, peers: tuple[Peer, ...], job: dict, work: Path, tokenizer: Path | None = None
) -> tuple[dict, dict]:
    """({peer name: runner}, {peer name: why it is not measured}) for `model` saved under `work` with its
    `tokenizer` (tokenizer.json; GGUF holds it, so the llama.cpp rows need it)."""
    from llm.run.loader import save_pretrained

    model_dir = save_pretrained(model, work / "llm", tokenizer)
    runners, missing = {}, {}
    for peer in peers:
        try:
            runners[peer.name] = peer.prepare(model_dir, work, job)
        except PeerMissing as e:
            missing[peer.name] = str(e)
        except Exception as e:  # a peer's own failure is its row's note, never the benchmark's end
            missing[peer.name] = f"failed: {type(e).__name__}: {e}"
    return runners, missing


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


@torch.no_grad()
def interleaved(runners: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """{name: median seconds of one call}, every runner called once per round after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds + 1):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def greedy_check(model: nn.Module, quantized: nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Greedy tokens of `quantized` against those of `model` with the quantized weights dequantized into it
    (so the difference is the kernels' arithmetic only): equal over `new_tokens`, or the first step where they
    differ and the dequantized model's margin there (top-1 minus top-2 logit)."""
    from llm.compress.quantized import QuantizedWeight
    from llm.models.generation import generate

    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(getattr(m, "weight", None), QuantizedWeight):
                reference.get_submodule(name).weight.copy_(m.weight.dequantize())
    ours = generate(quantized, prompt, max_new_tokens=new_tokens, temperature=0.0, eos_token_id=[])
    theirs = generate(reference, prompt, max_new_tokens=new_tokens, temperature=0.0, eos_token_id=[])
    differ = (ours != theirs).nonzero()
    if not len(differ):
        return {"steps": new_tokens, "equal": True}
    step = int(differ[0, 1]) - prompt.shape[1]
    with torch.no_grad():
        logits = reference(theirs[:, : prompt.shape[1] + step]).logits[0, -1]
    top2 = logits.topk(2).values
    return {"steps": new_tokens, "equal": False, "first_difference": step, "margin": float(top2[0] - top2[1])}


# ----------------------------------------------------------------------------
# Measuring: llm models and peers, interleaved
# ----------------------------------------------------------------------------


def runner(model: nn.Module, job: dict) -> Callable[[], object]:
    """One timed call: greedy generation of job["new_tokens"] after job["prompt"] (eos ignored), the weights laid
    out as `llm generate` runs them (`decode_layout`, in place), or a forward pass over job["inputs"]."""
    from llm.models.generation import decode_layout, generate

    if "prompt" in job:
        decode_layout(model)
        return lambda: generate(
            model, job["prompt"], max_new_tokens=job["new_tokens"], temperature=0.0, eos_token_id=[]
        )
    return lambda: model(**job["inputs"])


def measure(
    models: dict[str, nn.Module], peers: tuple[Peer, ...], job: dict, rounds: int, tokenizer: Path | None = None
) -> tuple[list, dict]:
    """(rows, {peer: why not measured}): `models` (the first is the baseline) and the `peers` of the first (with
    its `tokenizer`, see `prepare_peers`), interleaved over `rounds`. A decode job (job["prompt"] (1, T),
    job["new_tokens"]) gives tokens/s over the whole generate call, MB streamed per token and the bandwidth limit;
    a forward job (job["inputs"]) examples/s."""
    decode = "prompt" in job
    base = next(iter(models))
    with tempfile.TemporaryDirectory(prefix="llm-bench-peers-") as work:
        peer_runners, missing = prepare_peers(models[base], peers, job, Path(work), tokenizer)
        rate = copy_rate() if decode else None
        seconds = interleaved({**{n: runner(m, job) for n, m in models.items()}, **peer_runners}, rounds)
    per_call = job["new_tokens"] if decode else next(iter(job["inputs"].values())).shape[0]
    unit = "tokens_per_s" if decode else "examples_per_s"
    fp32_weights = streamed_bytes(models[base]) / 4
    rows = []
    for name, s in seconds.items():
        row = {"name": name, unit: per_call / s, "vs_baseline": seconds[base] / s}
        if decode:
            peer = next((p for p in peers if p.name == name), None)
            nbytes = streamed_bytes(models[name]) if name in models else fp32_weights * (peer.bytes_per_weight or 4)
            row.update(streamed_MB=nbytes / 1e6, limit_tokens_per_s=rate * 1e9 / nbytes, copy_GBps=rate)
            row["of_limit"] = row[unit] / row["limit_tokens_per_s"]
        rows.append(row)
    return rows, missing


def speed_table(rows: list[dict], missing: dict) -> str:
    """The rows of `measure` as text, with the peers not measured and the note on unstructured sparsity."""
    headers = {
        "tokens_per_s": "tok/s",
        "examples_per_s": "ex/s",
        "vs_baseline": f"vs {rows[0]['name']}",
        "streamed_MB": "MB/token",
        "limit_tokens_per_s": "limit tok/s",
        "of_limit": "of limit",
    }
    notes = {"limit_tokens_per_s": f"copy rate {rows[0].get('copy_GBps', 0):.1f} GB/s (read + write) / MB per token"}
    columns = [c for c in ("name", *headers) if c in rows[0]]
    lines = [format_table(rows, columns, headers, notes)]
    lines += [f"{peer}: not measured: {why}" for peer, why in missing.items()]
    lines.append("unstructured sparsity: no row; its zeros are stored densely and no sparse kernel runs on a CPU")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# The two benchmarks
# ----------------------------------------------------------------------------


def _write(name: str, rows: list[dict], missing: dict, out_dir, title: str, **extra) -> Path:
    from llm.kernels import cpu_build

    isa = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "kernel_builds": cpu_build.cpu_isas()}
    path = write_results(name, rows, out_dir, not_measured=missing, cpu_isa=isa, **extra)
    plot(rows, path.with_suffix(".png"), title)
    return path


def report(path: Path) -> str:
    """What a benchmark's results JSON at `path` says, for the terminal: its table, the peers not measured,
    the greedy check of a decode run and where the results are."""
    results = json.loads(Path(path).read_text())
    lines = [speed_table(results["rows"], results["not_measured"])]
    if "greedy_int8" in results:
        lines.append(f"greedy tokens, llm int8 vs the dequantized fp32 model: {results['greedy_int8']}")
    lines.append(f"wrote {path} and {Path(path).with_suffix('.png').name}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Throughput bars, llm's rows blue and the peers' orange, the bandwidth limit marked where known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = "tokens_per_s" if "tokens_per_s" in rows[0] else "examples_per_s"
    names = [r["name"] for r in rows][::-1]
    values = [r[unit] for r in rows][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    ax.barh(names, values, color=["#1f77b4" if n.startswith("llm") else "#ff7f0e" for n in names])
    limits = [r.get("limit_tokens_per_s") for r in rows][::-1]
    if any(limits):
        ax.scatter(limits, names, marker="|", s=300, color="black", label="bandwidth limit")
        ax.legend(loc="lower right")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    ax.set_xlabel("tokens/s" if unit == "tokens_per_s" else "examples/s")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load(model: str, task: str | dict) -> nn.Module:
    """A model path (any the loader reads), or a preset name built with random weights for `task`."""
    from llm.run.loader import load_model

    if Path(model).exists():
        return load_model(model).float().eval()
    from llm.config import with_base
    from llm.tasks import build_model

    torch.manual_seed(0)
    return build_model(with_base({"base": model}, "models", "--model"), task).eval()


def decode(model: str, prompt_tokens: int, new_tokens: int, rounds: int, out_dir=None) -> Path:
    """The decode benchmark of `model` (see the module docstring); returns the JSON's path."""
    from llm.run.loader import find_tokenizer

    base = load(model, "causal_lm")
    models = variants(base, DECODE_QUANTIZED)
    prompt = torch.randint(0, base.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    tokenizer = find_tokenizer(model) if Path(model).exists() else None  # a preset has none: no llama.cpp rows
    rows, missing = measure(models, DECODE_PEERS, {"prompt": prompt, "new_tokens": new_tokens}, rounds, tokenizer)
    check = greedy_check(base, models["llm int8"], prompt, new_tokens)
    settings = dict(model=model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds, batch=1)
    title = f"decode, {model}: batch 1, {prompt_tokens}-token prompt, {new_tokens} new tokens"
    return _write("decode", rows, missing, out_dir, title, settings=settings, greedy_int8=check)


def classify(model: str, batch: int, seq_len: int, rounds: int, out_dir=None) -> Path:
    """The classifier-forward benchmark of `model` over a batch of random token ids (`batch` x `seq_len`, the
    last tenth of each row padding); returns the JSON's path."""
    base = load(model, {"name": "text_classification", "pooling": "mean"})
    models = variants(base, CLASSIFY_QUANTIZED)
    input_ids = torch.randint(0, base.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, seq_len - seq_len // 10 :] = 0
    job = {"inputs": {"input_ids": input_ids, "attention_mask": attention_mask}}
    rows, missing = measure(models, CLASSIFY_PEERS, job, rounds)
    settings = dict(model=model, batch=batch, seq_len=seq_len, rounds=rounds)
    return _write(
        "classify", rows, missing, out_dir, f"classifier forward, {model}: {batch} x {seq_len}", settings=settings
    )

"""What each quantized variant's blocks do to their layers on held-out data: for every Linear inside the blocks,
the relative squared output error ||(W - Q) X||^2 / ||W X||^2 over the float model's held-out inputs X (the
quantity GPTQ minimises on its calibration inputs; Frantar et al. 2022, eq. 1), summed over the layers. It
separates "the algorithm reduced the layers' error" from the perplexity, which moves by first-order noise when
the error is small.

    PYTHONPATH=. python benchmarks/quantized_layer_error.py runs/quickstart/export data/quickstart/val \\
        runs/compress_algorithms/quickstart/int4-g128-rtn runs/compress_algorithms/quickstart/int4-g128-gptq

Prints one line per layer and a JSON of the totals ({variant: relative squared error}).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llm.compress.quantized import QuantizedLinear  # noqa: E402
from llm.run.compress import calibration_batches  # noqa: E402
from llm.run.loader import load_model  # noqa: E402


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="the float model")
    p.add_argument("data", help="held-out shard directory")
    p.add_argument("variants", nargs="+", help="quantized variants of the model (AWQ's rescaled ones do not compare)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    model = load_model(args.model).eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if name.startswith("transformer.blocks.") and isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, []).append(a[0]))
    reader = calibration_batches(model, args.data, args.model, args.batch_size)
    for batch in itertools.islice(iter(reader.next_batch, None), args.batches):
        model(input_ids=batch["input_ids"])
    variants = {v: load_model(v) for v in args.variants}
    error, norm = dict.fromkeys(variants, 0.0), 0.0
    for name, xs in inputs.items():
        x = torch.cat(xs).flatten(0, -2).double()
        w = model.get_submodule(name).weight.double()
        reference = (x @ w.T).pow(2).sum().item()
        norm += reference
        line = []
        for v, variant in variants.items():
            q = variant.get_submodule(name)
            q = q.weight.dequantize() if isinstance(q, QuantizedLinear) else q.weight
            e = (x @ (w - q.double()).T).pow(2).sum().item()
            error[v] += e
            line.append(f"{Path(v).name} {e / reference:.2e}")
        print(name, *line)
    print(json.dumps({v: e / norm for v, e in error.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The compression figures of docs/compression.md on the README's quickstart model.

Needs, in the repository root: runs/quickstart/export (llm pretrain configs/recipes/quickstart.yaml),
and for the distillation and recovery rows the runs of configs/compress/distill_quickstart.yaml
(with and without the teacher) and configs/compress/prune_recover_quickstart.yaml (see the docs).
Writes the variants under runs/quickstart/compress/, the report (table, JSON, PNG) and one JSON
of every figure and check under benchmarks/results/.

    PYTHONPATH=. python benchmarks/compress_quickstart.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from llm.compress import report
from llm.fileio import write_atomic
from llm.run.compress import calibration_batches, compress_report, prune_model, quantize_model
from llm.run.evaluate import evaluate_model
from llm.run.loader import load_model

ROOT = Path("runs/quickstart")
ORIGINAL = ROOT / "export"
VAL, TRAIN = "data/quickstart/val", "data/quickstart/train"
OUT = ROOT / "compress"
STUDENTS = {  # distilled students (recipe configs/compress/distill_quickstart.yaml, its --set overrides)
    "T=2, alpha=0.5": Path("runs/quickstart_student/export"),
    "T=1, alpha=0.9": Path("runs/quickstart_student_t1/export"),
}
ALONE = Path("runs/quickstart_student_alone/export")
RECOVERED = Path("runs/quickstart_struct25_recovered/export")


@torch.no_grad()
def teacher_kl(teacher_path: Path, student_path: Path, batches: int = 16) -> float:
    """Mean over validation tokens of KL(teacher || student) at temperature 1, nats."""
    teacher, student = load_model(teacher_path).eval(), load_model(student_path).eval()
    data = calibration_batches(teacher, VAL, str(teacher_path), batch_size=8)
    total, count = 0.0, 0
    for _ in range(batches):
        batch = data.next_batch()
        if batch is None:
            break
        t = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits.double(), -1)
        s = torch.log_softmax(student(input_ids=batch["input_ids"]).logits.double(), -1)
        total += (t.exp() * (t - s)).sum(-1).sum().item()
        count += batch["input_ids"].numel()
    return total / count


def distillation() -> dict:
    """Perplexity and KL to the teacher of each distilled student and of the student trained alone."""

    def measure(path: Path) -> dict:
        return {
            "ppl": evaluate_model(path, VAL)["ppl"],
            "kl_to_teacher": teacher_kl(ORIGINAL, path),
            "parameters": load_model(path).num_parameters(),
        }

    return {
        "student_alone": measure(ALONE),
        "distilled": {name: measure(p) for name, p in STUDENTS.items() if p.is_dir()},
        "teacher_ppl": evaluate_model(ORIGINAL, VAL)["ppl"],
    }


def main() -> int:
    started = time.strftime("%Y%m%dT%H%M%S")
    if sys.argv[1:] == ["--distillation"]:
        figures = distillation()
        out = Path("benchmarks/results") / f"compress_quickstart_distill-{started}.json"
        payload = {"command": "PYTHONPATH=. python " + " ".join(sys.argv), "environment": report.environment()}
        write_atomic(out, json.dumps({**payload, "figures": figures}, indent=2) + "\n")
        print(json.dumps(figures, indent=2))
        return 0
    variants: dict[str, Path] = {"fp32 original": ORIGINAL}
    for method in ("int8", "int8-dynamic", "int4"):
        variants[f"{method}" + (" g32" if method == "int4" else "")] = quantize_model(
            str(ORIGINAL), str(OUT / method), method=method, group_size=32
        )
    for method in ("magnitude", "wanda"):
        for sparsity in (0.5, 0.7):
            name = f"{method} {int(sparsity * 100)}%"
            prune_model(str(ORIGINAL), str(OUT / name.replace(" ", "").replace("%", "")), method=method,
                        sparsity=sparsity, data=TRAIN)  # fmt: skip
            variants[name] = OUT / name.replace(" ", "").replace("%", "")
    prune_model(str(ORIGINAL), str(OUT / "struct25"), structured="heads=1,neurons=128")
    variants["heads+neurons -25%"] = OUT / "struct25"
    if RECOVERED.is_dir():
        variants["heads+neurons -25% + 60 steps"] = RECOVERED
    names = list(variants)
    result = compress_report(
        str(ORIGINAL), [str(p) for p in list(variants.values())[1:]], VAL, "benchmarks/results/compress_quickstart",
        names=names, new_tokens=64, rounds=5,
    )  # fmt: skip
    rows = {r["name"]: r for r in result["rows"]}
    base = rows["fp32 original"]
    ppl = {n: r["metrics"]["ppl"] for n, r in rows.items()}
    size = {n: base["size_bytes"] / r["size_bytes"] for n, r in rows.items()}
    figures = {
        "int8_times_smaller": size["int8"],
        "int8_ppl_change": ppl["int8"] / ppl["fp32 original"] - 1,
        "int4_g32_times_smaller": size["int4 g32"],
        "int4_g32_ppl_change": ppl["int4 g32"] / ppl["fp32 original"] - 1,
        "magnitude50_ppl": ppl["magnitude 50%"],
        "wanda50_ppl": ppl["wanda 50%"],
        "magnitude70_ppl": ppl["magnitude 70%"],
        "wanda70_ppl": ppl["wanda 70%"],
        "struct25_ppl_change": ppl["heads+neurons -25%"] / ppl["fp32 original"] - 1,
        "struct25_params": rows["heads+neurons -25%"]["parameters"],
        "original_params": base["parameters"],
    }
    if RECOVERED.is_dir():
        figures["struct25_recovered_ppl_change"] = ppl["heads+neurons -25% + 60 steps"] / ppl["fp32 original"] - 1
    if ALONE.is_dir():
        figures["distillation"] = distillation()
    checks = {
        "int8 >= 3.5x smaller": figures["int8_times_smaller"] >= 3.5,
        "int8 ppl within 1%": abs(figures["int8_ppl_change"]) <= 0.01,
        "int4 g32 >= 6x smaller": figures["int4_g32_times_smaller"] >= 6,
        "wanda 50% ppl < magnitude 50%": figures["wanda50_ppl"] < figures["magnitude50_ppl"],
        "structured 25% fewer parameters": figures["struct25_params"] < figures["original_params"],
    }
    if "struct25_recovered_ppl_change" in figures:
        checks["structured 25% + recovery within 10%"] = figures["struct25_recovered_ppl_change"] <= 0.10
    if "distillation" in figures:
        alone = figures["distillation"]["student_alone"]
        for name, d in figures["distillation"]["distilled"].items():
            checks[f"distillation ({name}) lowers KL to teacher"] = d["kl_to_teacher"] < alone["kl_to_teacher"]
            checks[f"distilled student ({name}) ppl < student alone"] = d["ppl"] < alone["ppl"]
    out = Path("benchmarks/results") / f"compress_quickstart-{started}.json"
    payload = {
        "command": "PYTHONPATH=. python " + " ".join(sys.argv),
        "environment": report.environment(),
        "figures": figures,
        "checks": checks,
        "report": {k: result[k] for k in ("table", "json", "png")},
    }
    write_atomic(out, json.dumps(payload, indent=2) + "\n")
    print(json.dumps({"figures": figures, "checks": checks}, indent=2))
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The `llm` command line, generated from the llm.run functions it calls.

Each command calls one function in llm/run/ (COMMANDS below): its signature gives the arguments,
its docstring the help, as LitGPT builds its command line from its functions. Both are read from
the source with `ast`, so `llm --help` imports no torch; a function is imported when its command runs.

- a parameter before `*` is a positional argument, one after it a --flag (required if it has no
  default), named as the parameter with dashes for underscores;
- `bool`: a switch; `Literal[...]`: those choices; `list[X]` or `tuple[X, ...]`: one or more values
  (a flag may also repeat); `X | None`: an X that may be left out; `str`, `int`, `float` convert;
- a flag left out is left out of the call: the function's default is the only one (--help shows it);
- the docstring (Google style): its first paragraph is the command's line in `llm --help`, the text
  before `Args:` its description, `Args:` the help of each parameter, `Example:` the epilog.

A `UserError` (bad config, missing file, corrupt shard...) prints as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.util
import sys
import textwrap

from llm.errors import UserError

# command -> "module:function" of llm.run; a group -> (its help, its example, its commands)
COMMANDS = {
    "data": (
        "Tokenizers and Arrow shards.",
        "llm data prepare --help",
        {
            "tokenizer": "data:tokenizer",
            "prepare": "data:prepare",
            "prepare-images": "data:prepare_images",
            "examples": "data:examples",
            "inspect": "data:inspect",
            "verify": "data:verify",
        },
    ),
    "pretrain": "train:pretrain",
    "finetune": "train:finetune",
    "eval": "evaluate:evaluate_model",
    "convert": "convert:convert",
    "generate": "generate:generate_text",
    "model": ("Inspect model configs.", "llm model info gpt2-124m", {"info": "info:model_info"}),
    "compress": (
        "Quantize or prune a trained model, and report size, speed and quality.",
        "llm compress --help",
        {"quantize": "compress:quantize_model", "prune": "compress:prune_model", "report": "compress:compress_report"},
    ),
    "distill": "train:distill",
    "bench": (
        "Benchmarks: kernels, training, memory, long sequences, data, inference (decode, classify).",
        "llm bench train --help",
        {
            "kernels": "bench:kernels",
            "train": "bench:train",
            "memory": "bench:memory",
            "sequence": "bench:sequence",
            "data": "bench:data",
            "decode": "bench:decode",
            "classify": "bench:classify",
        },
    ),
    "plot": "plot:plot_run",
}

SCALARS = {"str": str, "int": int, "float": float}
LAUNCHER_ARGS = ("--local_rank=", "--local-rank=")  # deepspeed's launcher and torch.distributed.launch add these


@functools.cache
def _module(module: str) -> ast.Module:
    """The parsed source of llm/run/<module>.py (found without importing it)."""
    path = importlib.util.find_spec(f"llm.run.{module}").origin
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def function_node(target: str) -> ast.FunctionDef:
    """The definition of "module:function" in llm/run/, read without importing it."""
    module, name = target.split(":")
    for node in _module(module).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise LookupError(f"llm.run.{module} defines no function {name}")


def function(target: str):
    """The function "module:function" of llm.run, imported."""
    module, name = target.split(":")
    return getattr(importlib.import_module(f"llm.run.{module}"), name)


def _docstring(doc: str) -> tuple[str, dict[str, str], str]:
    """(description, {parameter: help}, example) of a Google-style docstring."""
    body, _, example = doc.partition("\nExample:\n")
    description, _, args = body.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    for line in textwrap.dedent(args).splitlines():
        name, colon, text = line.partition(": ")
        if colon and name.isidentifier():
            helps[name] = text.strip()
        elif line.strip():
            helps[next(reversed(helps))] += " " + line.strip()  # a continuation line
    return description.strip(), helps, textwrap.dedent(example).strip()


def _value(node: ast.expr, where: str) -> dict:
    """`type` (and `choices`) for a str, int, float or Literal[...] annotation."""
    if isinstance(node, ast.Name) and node.id in SCALARS:
        return {"type": SCALARS[node.id]}
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal":
        choices = ast.literal_eval(node.slice)
        choices = list(choices) if isinstance(choices, tuple) else [choices]
        return {"type": type(choices[0]), "choices": choices}
    raise TypeError(f"{where}: no command-line form for the annotation {ast.unparse(node)}")


def _kind(node: ast.expr, where: str) -> dict:
    """argparse keywords for a parameter's annotation (see the module docstring)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and ast.unparse(node.right) == "None":
        node = node.left
    if isinstance(node, ast.Name) and node.id == "bool":
        return {"action": "store_true"}
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in ("list", "tuple"):
        item = node.slice.elts[0] if isinstance(node.slice, ast.Tuple) else node.slice
        return {"nargs": "+", **_value(item, where)}
    return _value(node, where)


def shown_default(value) -> str:
    """A default as --help shows it: "(default: 8)", "(default: 0 1 2 3)"; empty for None and False,
    whose meaning the parameter's help says."""
    if value is None or value is False:
        return ""
    return f" (default: {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value})"


def _add_arguments(parser: argparse.ArgumentParser, node: ast.FunctionDef, helps: dict[str, str]) -> None:
    a = node.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + a.defaults
    params = [(arg, default, False) for arg, default in zip(positional, defaults)]
    params += [(arg, default, True) for arg, default in zip(a.kwonlyargs, a.kw_defaults)]
    for arg, default, is_flag in params:
        where = f"llm.run function {node.name}, parameter {arg.arg}"
        if arg.arg not in helps:
            raise LookupError(f"{where}: not documented under Args:")
        kind = _kind(arg.annotation, where)
        value = None if default is None else ast.literal_eval(default)
        if kind.get("action") == "store_true" and value is not False:
            raise TypeError(f"{where}: a switch defaults to False")
        text = (helps[arg.arg] + shown_default(value)).replace("%", "%%")
        if is_flag:
            if "nargs" in kind:
                kind["action"] = "extend"
            parser.add_argument("--" + arg.arg.replace("_", "-"), required=default is None, help=text, **kind)
        elif "nargs" in kind:
            parser.add_argument(arg.arg, help=text, **{**kind, "nargs": "+" if default is None else "*"})
        elif default is None:
            parser.add_argument(arg.arg, help=text, **kind)
        else:
            raise TypeError(f"{where}: a positional argument with a default must be a list")


def _add_command(sub, name: str, target: str) -> None:
    node = function_node(target)
    description, helps, example = _docstring(ast.get_docstring(node) or "")
    parser = sub.add_parser(
        name,
        help=description.split("\n\n")[0].replace("\n", " "),
        description=description,
        epilog="example:\n" + textwrap.indent(example, "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # a flag left out is left out of the call
    )
    _add_arguments(parser, node, helps)
    parser.set_defaults(command=target)


def build_parser() -> argparse.ArgumentParser:
    from llm import __version__

    parser = argparse.ArgumentParser(
        prog="llm",
        description="Pretrain and fine-tune Transformer models with DeepSpeed ZeRO, Arrow data and fused kernels.",
        epilog="example:\n  llm pretrain configs/recipes/quickstart.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llm {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND", required=True)
    for name, entry in COMMANDS.items():
        if isinstance(entry, str):
            _add_command(sub, name, entry)
            continue
        summary, example, commands = entry
        group = sub.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        inner = group.add_subparsers(metavar="COMMAND", required=True)
        for command, target in commands.items():
            _add_command(inner, command, target)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from llm.log import setup_logging

    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith(LAUNCHER_ARGS)]
    args = vars(build_parser().parse_args(argv))  # ranks read LOCAL_RANK instead of LAUNCHER_ARGS
    target = args.pop("command")
    try:
        setup_logging(int(os.environ.get("RANK", "0") or 0))  # training sets it again once the rank is known
        function(target)(**args)
        return 0
    except UserError as e:
        print(f"llm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

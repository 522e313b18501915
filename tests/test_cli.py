"""The generated command line: every flag reaches the function its command calls under the parameter's
own name, with that function's default; checked against the imported functions (inspect, typing), not
against the source that llm.cli reads."""

import argparse
import inspect
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from llm import cli

ROOT = Path(__file__).resolve().parents[1]


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every command that calls a function."""
    if parser.get_default("command"):
        yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


COMMANDS = list(commands(cli.build_parser()))


def argparse_form(hint) -> dict:
    """What the annotation `hint` must become: type, choices, several values, switch."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if hint is bool:
        return {"switch": True}
    several = typing.get_origin(hint) in (list, tuple)
    if several:
        hint = args[0]
    if typing.get_origin(hint) is typing.Literal:
        choices = list(typing.get_args(hint))
        return {"type": type(choices[0]), "choices": choices, "several": several}
    return {"type": hint, "choices": None, "several": several}


def test_every_command_of_the_readme_is_generated():
    names = {" ".join(words) for words, _ in COMMANDS}
    assert {"data tokenizer", "data prepare", "data prepare-images", "data examples", "data inspect", "data verify",
            "pretrain", "finetune", "eval", "convert", "generate", "model info", "compress quantize",
            "compress prune", "compress report", "distill", "bench kernels", "bench train", "bench memory",
            "bench sequence", "bench data", "bench decode", "bench classify", "plot"} == names  # fmt: skip


@pytest.mark.parametrize("words,parser", COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_every_flag_reaches_its_function_under_its_own_name(words, parser):
    target = parser.get_default("command")
    function = cli.function(target)
    assert function.__module__.startswith("llm.run.")
    params = inspect.signature(function).parameters
    hints = typing.get_type_hints(function)
    actions = [a for a in parser._actions if a.dest not in ("help", "command")]
    assert sorted(a.dest for a in actions) == sorted(params)  # every flag a parameter, every parameter a flag
    for action in actions:
        p = params[action.dest]
        if p.kind is p.KEYWORD_ONLY:
            assert action.option_strings == ["--" + p.name.replace("_", "-")]
            assert action.required == (p.default is p.empty)
        else:
            assert p.kind is p.POSITIONAL_OR_KEYWORD and action.option_strings == []
        assert action.default is argparse.SUPPRESS  # left out, the function's own default applies
        form = argparse_form(hints[p.name])
        if form.get("switch"):
            assert isinstance(action, argparse._StoreTrueAction) and p.default is False
        else:
            assert action.type is form["type"] and action.choices == form["choices"]
            assert (action.nargs in ("+", "*")) == form["several"]
        assert action.help
        if p.default not in (p.empty, None) and p.default is not False:
            shown = " ".join(map(str, p.default)) if isinstance(p.default, tuple) else str(p.default)
            assert action.help.endswith(f"(default: {shown})"), action.help
        assert action.help.count("(default") <= 1, action.help
    assert parser.epilog.startswith("example:\n  ")
    assert f"llm {' '.join(words)}" in parser.epilog


def record(monkeypatch, target: str) -> list[dict]:
    module, name = target.split(":")
    calls = []
    monkeypatch.setattr(f"llm.run.{module}.{name}", lambda *args, **kwargs: calls.append((args, kwargs)))
    return calls


def test_flags_given_are_passed_converted_and_the_rest_left_to_the_function(monkeypatch):
    calls = record(monkeypatch, "compress:compress_report")
    argv = ["compress", "report", "m", "v1", "v2", "--data", "d", "--out", "o", "--max-batches", "3",
            "--names", "a", "b", "c"]  # fmt: skip
    assert cli.main(argv) == 0
    given = dict(model="m", variants=["v1", "v2"], data="d", out="o", max_batches=3, names=["a", "b", "c"])
    assert calls == [((), given)]

    calls = record(monkeypatch, "generate:generate_text")
    assert cli.main(["generate", "--model", "m", "--prompt", "x", "--prompt", "y", "--temperature", "0"]) == 0
    assert calls == [((), dict(model="m", prompt=["x", "y"], temperature=0.0))]

    calls = record(monkeypatch, "bench:train")
    assert cli.main(["bench", "train", "--stages", "2", "--stages", "3", "--models", "gpt2-tiny"]) == 0
    assert calls == [((), dict(stages=[2, 3], models=["gpt2-tiny"]))]  # not added to the default stages


def test_the_launchers_local_rank_is_dropped(monkeypatch):
    calls = record(monkeypatch, "train:pretrain")
    assert cli.main(["pretrain", "r.yaml", "--set", "a=1", "b=2", "--dry-run", "--local_rank=3"]) == 0
    assert calls == [((), dict(recipe="r.yaml", set=["a=1", "b=2"], dry_run=True))]


def test_a_bad_value_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compress", "quantize", "a", "b", "--method", "int3"])
    assert e.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


def test_help_imports_no_torch():
    code = (
        "import sys\nfrom llm.cli import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['compress', 'prune', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "example:\n  llm compress prune" in proc.stdout

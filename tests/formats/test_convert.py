"""Bad input to `llm convert --to FORMAT`: one line each, and nothing left behind (an earlier OUT kept whole)."""

from __future__ import annotations

import sys

import pytest

from llm.cli import main
from llm.run.loader import save_pretrained
from tests.conftest import build
from tests.formats.test_compressed_tensors import GPT


@pytest.fixture
def gpt(tmp_path):
    from llm import transforms

    save_pretrained(build(GPT), tmp_path / "gpt")
    save_pretrained(transforms.apply_transforms(build(GPT), [{"name": "quantize", "method": "int8"}]), tmp_path / "q8")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")  # an earlier export, which a failed one keeps
    return tmp_path


def one_line_error(capsys, args: list[str]) -> str:
    capsys.readouterr()
    assert main(["convert", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def untouched(root) -> bool:
    """OUT holds what it held before, and no staging folder is left beside it."""
    return [p.name for p in (root / "out").iterdir()] == ["config.json"] and sorted(p.name for p in root.iterdir()) == [
        "gpt",
        "out",
        "q8",
    ]


def test_a_format_that_cannot_hold_the_model_says_what_is_missing_and_which_can(gpt, capsys):
    err = one_line_error(capsys, [str(gpt / "gpt"), str(gpt / "out"), "--to", "sentence-transformers"])
    assert "a causal_lm model is no embedding model" in err and "(formats that can: llm, hf, gguf, onnx)" in err
    assert untouched(gpt)


def test_an_option_of_another_format_is_refused(gpt, capsys):
    err = one_line_error(capsys, [str(gpt / "gpt"), str(gpt / "out"), "--to", "hf", "--pooling", "first"])
    assert "--pooling does not apply to --to hf" in err and untouched(gpt)


@pytest.mark.parametrize(
    "module, package, source, to",
    [
        ("compressed_tensors", "compressed-tensors", "q8", "hf"),
        ("sentence_transformers", "sentence-transformers", "enc", "sentence-transformers"),
    ],
)
def test_a_missing_runtime_package_is_named_with_its_pip_install(gpt, capsys, monkeypatch, module, package, source, to):
    if source == "enc":
        from tests.formats.test_compressed_tensors import BERT

        save_pretrained(build(BERT, task="encoder"), gpt / "enc")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    err = one_line_error(capsys, [str(gpt / source), str(gpt / "out"), "--to", to])
    assert err.endswith(f"pip install {package}")
    assert [p.name for p in (gpt / "out").iterdir()] == ["config.json"]
    assert not [p for p in gpt.iterdir() if p.name.startswith(".out")]


def test_an_output_that_cannot_be_written_is_one_line(gpt, capsys):
    (gpt / "file").write_text("not a directory")
    err = one_line_error(capsys, [str(gpt / "gpt"), str(gpt / "file" / "out"), "--to", "hf"])
    assert f"{gpt / 'file' / 'out'}: cannot write" in err
    assert (gpt / "file").read_text() == "not a directory"

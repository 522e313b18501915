"""`llm data ...` end to end through the CLI entry point; errors print one line and exit 2."""

import pytest

from llm.cli import main


def test_data_commands(tmp_path, capsys, bpe):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(f'{{"text": "line {i} of the corpus, number {i * 7}"}}\n' for i in range(40)))
    assert main(["data", "tokenizer", "--adopt", str(bpe), "--out", str(tmp_path / "tok")]) == 0
    assert (
        main(
            [
                "data",
                "prepare",
                str(corpus),
                "--tokenizer",
                str(tmp_path / "tok"),
                "--out",
                str(tmp_path / "s"),
                "--workers",
                "1",
                "--val-fraction",
                "0.2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "MB/s" in out and "/train:" in out and "/val:" in out
    assert main(["data", "verify", str(tmp_path / "s" / "train"), "--vocab-size", "600"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 's' / 'train'}: 1 token shard OK (sha256")
    assert main(["data", "inspect", str(tmp_path / "s" / "train")]) == 0
    assert "line" in capsys.readouterr().out  # decoded with the manifest's tokenizer
    assert main(["data", "verify", str(tmp_path / "s" / "train"), "--vocab-size", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm: error: ") and "manifest.json" in err and "\n" not in err


@pytest.mark.parametrize("command", ["tokenizer", "prepare", "prepare-images", "examples", "inspect", "verify"])
def test_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit):
        main(["data", command, "--help"])
    assert "example:\n  llm data" in capsys.readouterr().out

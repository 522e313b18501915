"""Data that cannot be trusted is refused, naming where: manifest paths stay inside their directory,
damaged shards are caught when read, a token id out of range names its shard and position; prepare
swaps a new dataset in only on success; one huge document is tokenized in bounded memory, one huge
fine-tuning example is cut before the tokenizer reads it, and an image header claiming more pixels
than llm decodes is one line naming the file."""

import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from llm.data import PackedTokens, prepare, verify
from llm.data import shards as S
from llm.data.prepare import split_text, write_token_shards
from llm.data.tokenizer import CHARS_PER_TOKEN, Tokenizer, head_text
from llm.errors import UserError
from tests.train.helpers import ROOT, env


@pytest.fixture
def shards(tmp_path):
    docs = [np.arange(i, i + 50) for i in range(0, 500, 50)]
    write_token_shards(tmp_path / "s", docs, vocab_size=1000, shard_tokens=200)
    return tmp_path / "s"


# -- case 10: every manifest path stays inside its directory -------------------------------------


@pytest.mark.parametrize("form", ["../../elsewhere/x.arrow", "sub/../../x.arrow", "/abs/x.arrow", "link.arrow", ""])
def test_manifest_paths_outside_the_directory_are_refused(shards, tmp_path, form):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / "x.arrow"
    outside.write_bytes((shards / "shard-00000.arrow").read_bytes())  # a valid shard, but not this directory's
    if form == "link.arrow":
        (shards / "link.arrow").symlink_to(outside)
    if form == "/abs/x.arrow":
        form = str(outside)
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["file"] = form
    path.write_text(json.dumps(manifest))
    for read in (lambda: PackedTokens(shards, 8), lambda: verify(shards)):  # training and `llm data verify`
        with pytest.raises(S.ShardError, match=r"shards\[0\]\.file .* is not a file of this directory"):
            read()


# -- case 11: integrity when data is read ---------------------------------------------------------


def test_a_flipped_byte_is_caught_when_the_shard_is_opened_for_training(shards):
    shard = shards / "shard-00001.arrow"
    PackedTokens(shards, 8)  # intact: reads
    data = bytearray(shard.read_bytes())
    offsets_end = data.index(np.array([250, 251], dtype=np.uint16).tobytes())  # a token value, not metadata
    data[offsets_end] ^= 1  # 250 -> 251: still a valid id, only the checksum notices
    shard.write_bytes(bytes(data))
    stream = PackedTokens(shards, 8)  # hashed in the background, off the reader's hot path
    stream.integrity.join()
    for read in (lambda: stream.samples_at([0, 1]), lambda: stream.get(0)):
        with pytest.raises(S.ShardError, match="shard-00001.arrow: contents differ from the manifest"):
            read()


def test_a_token_id_beyond_the_vocabulary_names_shard_and_position(shards):
    shard = shards / "shard-00002.arrow"
    data = bytearray(shard.read_bytes())
    at = data.index(np.array([412, 413], dtype=np.uint16).tobytes())
    data[at + 3] = 0xFF  # token 413 -> 0xFF9D, far beyond the 1000-id vocabulary
    shard.write_bytes(bytes(data))
    # shard 2 holds documents 8, 9 (tokens 400..499): 413 is document 0 of the shard, token 13, position 13
    with pytest.raises(S.ShardError, match=r"shard-00002.arrow: token id 65437 at token position 13 \(document 0"):
        PackedTokens(shards, 8)


# -- case 3: prepare builds beside the old dataset and swaps only on success ------------------------


def test_prepare_into_an_existing_dataset_keeps_it_when_the_input_is_bad(tmp_path, bpe):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document number {i} " * 5}) + "\n" for i in range(40)))
    prepare([good], bpe, tmp_path / "out", val_fraction=0.2, workers=1)
    before = {
        p.name: p.read_bytes() for split in ("train", "val") for p in sorted((tmp_path / "out" / split).iterdir())
    }

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin1.jsonl:2: not UTF-8 text"):
        prepare([latin1], bpe, tmp_path / "out", val_fraction=0.2, workers=1)
    plain = tmp_path / "latin1.txt"
    plain.write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match=r"latin1.txt: not UTF-8 text"):
        prepare([plain], bpe, tmp_path / "out", workers=1)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="no documents left"):
        prepare([tmp_path / "empty.jsonl"], bpe, tmp_path / "out", workers=1)
    after = {p.name: p.read_bytes() for split in ("train", "val") for p in sorted((tmp_path / "out" / split).iterdir())}
    assert after == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train", "val"]  # nothing staged left behind
    verify(tmp_path / "out" / "train")

    prepare([good], bpe, tmp_path / "out", workers=1)  # a successful prepare without val replaces both
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train"]


# -- case 13: one huge document in bounded memory --------------------------------------------------

PEAK = """
import sys
from pathlib import Path
import numpy, tokenizers, llm.data  # imports before the baseline


def peak():  # this process's high-water mark (ru_maxrss would carry the parent's over exec)
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024


text = Path(sys.argv[2]).read_text()
before = peak()
if sys.argv[1] == "prepare":
    from llm.data import prepare as P, shards as S
    sys.modules["llm.data.prepare"].PIECE_CHARS = 1 << 16  # (llm.data.prepare is also a function's name)
    P([sys.argv[2]], sys.argv[3], sys.argv[4], workers=1)
    m = S.load_manifest(Path(sys.argv[4]) / "train")
    ids = S.shard_tokens(Path(sys.argv[4]) / "train" / m["shards"][0]["file"], m["shards"][0], m["dtype"])[0]
    Path(sys.argv[4], "ids.npy").write_bytes(ids[:-1].astype("uint32").tobytes())  # without the EOS
else:
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(sys.argv[3]).encode(text, add_special_tokens=False).ids
    import numpy as np
    Path(sys.argv[4], "ids.npy").write_bytes(np.asarray(ids, dtype="uint32").tobytes())
print(peak() - before)
"""


def test_one_huge_line_is_tokenized_in_bounded_memory_with_the_same_tokens(tmp_path, bpe):
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "value", "import", "(x)", "for", "in", "range", "12", "  ", "\t", "é"]
    text = " ".join(rng.choice(words, size=200_000))  # ~0.9 MB on one line, no newline
    path = tmp_path / "huge.txt"
    path.write_text(text)
    peaks = {}
    for how in ("prepare", "whole"):
        out = tmp_path / how
        out.mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", PEAK, how, str(path), str(bpe), str(out)],
            cwd=ROOT,
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[how] = int(proc.stdout.strip().splitlines()[-1])
    ours = np.frombuffer((tmp_path / "prepare" / "ids.npy").read_bytes(), dtype=np.uint32)
    whole = np.frombuffer((tmp_path / "whole" / "ids.npy").read_bytes(), dtype=np.uint32)
    np.testing.assert_array_equal(ours, whole)  # cutting at single spaces does not change a token
    assert peaks["prepare"] < peaks["whole"] / 3, peaks  # the tokenizer's per-character state, bounded


def test_split_text_cuts_only_between_words(bpe):
    tok = Tokenizer(bpe)
    text = "alpha  beta\tgamma \n delta " * 300 + "x" * 5000
    pieces = split_text(text, 1000)
    assert "".join(pieces) == text and max(len(p) for p in pieces) <= 1000
    joined = [i for p in pieces[:-6] for i in tok.encode_batch([p])[0]]
    assert joined == tok.encode_batch(["".join(pieces[:-6])])[0]


# -- one huge fine-tuning example: cut before tokenizing -------------------------------------------

EXAMPLE_PEAK = """
import json, sys
from pathlib import Path
from tokenizers import Tokenizer as HF
from llm.config import build_config
from llm.data.config import DataConfig
from llm.data.tokenizer import CHARS_PER_TOKEN, Tokenizer, head_text
from llm.models.config import ModelConfig
from llm.tasks import get_task


def peak():  # this process's high-water mark
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024


path, tokenizer = Path(sys.argv[1]), sys.argv[2]
model = dict(vocab_size=1000, max_seq_len=64, d_model=16, n_layers=1, n_heads=2, d_ff=32)
model = build_config(ModelConfig, model, "model")
data = build_config(DataConfig, {"train": str(path), "tokenizer": tokenizer, "seq_len": 32}, "data")
task = get_task({"name": "text_classification", "labels": ["a", "b"]})
Tokenizer(tokenizer).encode("warm up")
before = peak()
stream, _ = task.file_stream(model, data, path, 0, 0, 1)
grown = peak() - before
whole = HF.from_file(tokenizer)  # the reference: the whole text, truncated by the tokenizer itself
whole.enable_truncation(max_length=32)
expected = [e.ids for e in whole.encode_batch([json.loads(line)["text"] for line in path.open()])]
print(json.dumps({"grown": grown, "ids": [s["input_ids"].tolist() for s in stream.samples], "expected": expected}))
"""


def test_one_huge_fine_tuning_example_is_cut_before_the_tokenizer_reads_it(tmp_path, bpe):
    """A 2 MB example of a JSONL that data.seq_len cuts to 32 tokens: its tokenizer state took ~320 MB."""
    rng = np.random.default_rng(0)
    words = ["the", "movie", "was", "slow", "but", "kind", "é", "(x)", "  ", "\t"]
    rows = [{"text": "a fine film", "label": "a"}, {"text": " ".join(rng.choice(words, 500_000)), "label": "b"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run(
        [sys.executable, "-c", EXAMPLE_PEAK, str(path), str(bpe)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ids"] == result["expected"]  # the same 32 tokens as the whole text, cut by the tokenizer
    assert result["grown"] < 40e6, result["grown"]  # 533 MB before the cut


def test_head_text_keeps_the_first_tokens_of_the_whole_text(bpe, wordpiece):
    text = "alpha  beta\tgamma \n delta, (epsilon) é " * 2000 + "x" * 5000
    for path in (bpe, wordpiece):
        tok = Tokenizer(path)
        head = head_text(text, 20)
        assert text.startswith(head) and 20 * CHARS_PER_TOKEN // 2 <= len(head) <= 20 * CHARS_PER_TOKEN
        assert tok.encode(head)[:20] == tok.encode(text)[:20]
    assert head_text("short", 20) == "short"


# -- an image whose header claims more pixels than llm decodes -------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, without them (what a decompression bomb starts as)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20_000, 9_000], ids=["pillow-bomb", "over-llm-bound"])
def test_an_image_claiming_too_many_pixels_is_one_line_naming_it(tmp_path, capsys, side):
    from PIL import Image

    from llm.cli import main

    (tmp_path / "photos" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "photos" / "cat" / "a.png")
    (tmp_path / "photos" / "cat" / "b.png").write_bytes(png_header(side, side))
    rc = main(["data", "prepare-images", str(tmp_path / "photos"), "--size", "4", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"cat/b.png: {side}x{side} pixels" in err[0] or (side > 9_000 and "cat/b.png: Image size" in err[0])
    assert list((tmp_path / "out").iterdir()) == []  # nothing written, nothing staged

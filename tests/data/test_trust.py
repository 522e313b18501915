"""Data that cannot be trusted is refused, naming where: manifest paths stay inside their directory,
damaged shards are caught when read, a token id out of range names its shard and position; prepare
swaps a new dataset in only on success; one huge document is tokenized in bounded memory."""

import json
import subprocess
import sys

import numpy as np
import pytest

from llm.data import PackedTokens, prepare, verify
from llm.data import shards as S
from llm.data.prepare import split_text, write_token_shards
from llm.data.tokenizer import Tokenizer
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

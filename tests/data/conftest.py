"""Shared fixtures: a small real tokenizer and corpus (stdlib), synthetic shards whose windows identify themselves."""

import numpy as np
import pytest

from llm.data import train_tokenizer
from llm.data.prepare import write_token_shards


@pytest.fixture(scope="session")
def bpe(tmp_path_factory):
    return train_tokenizer("stdlib", tmp_path_factory.mktemp("tok"), vocab_size=600, limit_bytes=300_000)


@pytest.fixture(scope="session")
def counting_shards(tmp_path_factory):
    """Tokens 0, 1, 2, ... (uint32 ids) over several shards and documents: window i starts with token i * seq_len."""
    out = tmp_path_factory.mktemp("counting")
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, 10_000), size=60, replace=False))
    docs = np.split(np.arange(10_000, dtype=np.int64), cuts)
    write_token_shards(out, docs, vocab_size=1 << 20, shard_tokens=1500)
    return out


@pytest.fixture(scope="session")
def wordpiece(tmp_path_factory):
    return train_tokenizer(
        "stdlib", tmp_path_factory.mktemp("wp"), kind="wordpiece", vocab_size=800, limit_bytes=300_000
    )


@pytest.fixture(scope="session")
def wordpiece_shards(tmp_path_factory, wordpiece):
    from llm.data import prepare

    out = tmp_path_factory.mktemp("wp_shards")
    prepare("stdlib", wordpiece, out, workers=1, limit_bytes=400_000)
    return out / "train"

"""data.document_mask: packed causal-LM windows get document ids, positions restarting at each document and
no target at an EOS, checked against a reference that walks each window token by token."""

import numpy as np
import pytest
import torch

from llm.config import ConfigError
from llm.data import PackedDocuments
from llm.data.config import DataConfig
from llm.data.prepare import write_token_shards
from llm.errors import UserError
from llm.kernels.reference import IGNORE_INDEX
from llm.models.config import ModelConfig
from llm.tasks import get_task

EOS = 7


def walked(window: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(document id, position, label) of every input position of one window of seq_len + 1 tokens."""
    docs, positions, labels = [], [], []
    doc, position = 0, 0
    for token, target in zip(window[:-1], window[1:]):
        docs.append(doc)
        positions.append(position)
        labels.append(IGNORE_INDEX if token == EOS else target)
        position += 1
        if token == EOS:
            doc, position = doc + 1, 0
    return docs, positions, labels


def check_batch(batch: dict, windows: torch.Tensor) -> None:
    assert torch.equal(batch["input_ids"], windows[:, :-1])
    for row, window in enumerate(windows.tolist()):
        docs, positions, labels = walked(window)
        assert batch["document_ids"][row].tolist() == docs
        assert batch["position_ids"][row].tolist() == positions
        assert batch["labels"][row].tolist() == labels


def test_collator_walks_every_window():
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 12, (6, 33), generator=g)  # EOS (7) anywhere: first, last, twice in a row
    windows[0, 0], windows[1, -2], windows[2, 4:6] = EOS, EOS, EOS
    check_batch(PackedDocuments(EOS)(windows), windows)


def test_causal_lm_reads_documents_from_the_manifests_eos(tmp_path):
    rng = np.random.default_rng(1)
    docs = [np.append(rng.integers(8, 40, int(n)), EOS) for n in rng.integers(0, 20, 40)]
    info = {"path": None, "sha256": "none", "eos_id": EOS}
    write_token_shards(tmp_path / "shards", docs, vocab_size=64, tokenizer_info=info, shard_tokens=100)
    data = DataConfig(train=str(tmp_path / "shards"), seq_len=16, document_mask=True)
    cfg = ModelConfig(vocab_size=64, max_seq_len=16, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    task = get_task("causal_lm")
    batches = task.batches(cfg, data, "train", seed=0, micro_batch_size=4, rank=0, world_size=1)
    stream = batches.loader.dataset
    for _ in range(5):
        start = stream.position  # one rank: the batch is the windows at the next 4 global positions
        check_batch(batches.next_batch(), stream.samples_at(stream.rank_positions(start, 0, 4)))

    write_token_shards(tmp_path / "no_eos", docs, vocab_size=64)
    with pytest.raises(UserError, match="^data.document_mask: .*no_eos: the manifest names no EOS id"):
        task.batches(cfg, DataConfig(train=str(tmp_path / "no_eos"), document_mask=True), "train", 0, 4, 0, 1)


def test_synthetic_data_has_no_documents():
    with pytest.raises(ConfigError, match="^data.document_mask: needs shards"):
        DataConfig(source="synthetic", document_mask=True).validate()

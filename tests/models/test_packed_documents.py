"""Packed documents at the model level: a packed row of k documents (data.document_mask's batch: document
ids, positions restarting at each document, no target at an EOS) gives every document the logits it gets
alone, and the packed loss is the mean of the documents' own loss terms, in every attention backend this
machine runs (torch; triton under the interpreter).

The reference is each document run through the model on its own (no document ids, default positions)."""

import pytest
import torch

from llm import kernels
from llm.data import PackedDocuments
from tests.conftest import build, rel_err

EOS = 0
ARCHS = {
    "gpt": {"family": "gpt", "position": "learned"},
    "llama": {"family": "llama", "position": "rotary", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_heads": 2},
}
# two packed rows of 21 tokens: documents of these lengths, each ending with EOS (a 1-token document is a lone EOS)
LENGTHS = [[6, 1, 9, 5], [13, 8]]


def documents(generator: torch.Generator) -> list[list[torch.Tensor]]:
    return [
        [torch.cat((torch.randint(1, 50, (n - 1,), generator=generator), torch.tensor([EOS]))) for n in row]
        for row in LENGTHS
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ARCHS)
def test_each_packed_document_gets_its_logits_and_loss_alone(arch, backend):
    model = build({"vocab_size": 50, "max_seq_len": 32, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64,
                   "dropout": 0.0, "attention_dropout": 0.0, **ARCHS[arch]}).eval()  # fmt: skip
    g = torch.Generator().manual_seed(3)
    docs = documents(g)
    # each window holds its documents whole, plus the next token (the last EOS's target, which is not predicted)
    windows = torch.stack([torch.cat((*row, torch.randint(1, 50, (1,), generator=g))) for row in docs])
    batch = PackedDocuments(EOS)(windows)
    with torch.no_grad(), kernels.use({"attention": backend}):
        packed = model(**batch)
    terms, alone_loss_sum = 0, 0.0
    with torch.no_grad():
        for b, row in enumerate(docs):
            start = 0
            for doc in row:
                end = start + len(doc)
                alone = model(doc[None]).logits[0]
                assert rel_err(packed.logits[b, start:end], alone) < 1e-5, (b, start, end)
                if len(doc) > 1:  # the document's own next-token terms, its EOS target the last
                    alone_loss_sum += model(doc[None, :-1], labels=doc[None, 1:]).loss.double() * (len(doc) - 1)
                    terms += len(doc) - 1
                start = end
    assert abs(packed.loss.double() - alone_loss_sum / terms) < 1e-5 * alone_loss_sum / terms

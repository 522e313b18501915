"""Every task model: shapes, masking, and each loss against a float64 computation."""

import pytest
import torch
import torch.nn.functional as F

from llm.models import ModelOutput
from llm.models.config import ModelConfig
from llm.tasks import build_model
from tests.conftest import rel_err

TEXT = dict(vocab_size=97, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, d_ff=64)
BERT = dict(family="bert", causal=False, norm_position="post", type_vocab_size=2, pooler=True, mlp="gelu")
LLAMA = dict(family="llama", norm="rmsnorm", position="rotary", mlp="swiglu", bias=False, n_kv_heads=2)
VIT = dict(
    family="vit",
    causal=False,
    image_size=16,
    patch_size=4,
    num_channels=3,
    d_model=32,
    n_layers=2,
    n_heads=4,
    d_ff=64,
    mlp="gelu",
)


TASK_OPTIONS = ("num_labels", "pooling", "temperature", "nsp")


def model(task="causal_lm", **kw):
    options = {k: kw.pop(k) for k in TASK_OPTIONS if k in kw}
    cfg = ModelConfig(**kw)
    cfg.validate()
    return build_model(cfg, {"name": task, **options}).double()


def test_causal_lm_loss_is_shifted_cross_entropy():
    m = model(**TEXT)
    ids = torch.randint(0, 97, (2, 12))
    labels = torch.cat((ids[:, 1:], torch.full((2, 1), -100)), dim=1)
    out = m(ids, labels=labels)
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 12, 97)
    assert out.hidden_states.shape == (2, 12, 32)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert rel_err(out.loss, ref) < 1e-10
    assert m(ids, labels=labels, return_logits=False).logits is None


@pytest.mark.parametrize(
    "arch", [TEXT, {**TEXT, **LLAMA}, {**TEXT, "position": "sinusoidal"}], ids=["gpt", "llama", "sin"]
)
def test_causal_model_never_sees_the_future(arch):
    m = model(**arch)
    ids = torch.randint(0, 97, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 97
    a, b = m(ids).logits, m(changed).logits
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-12)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_padding_does_not_reach_real_tokens():
    m = model(**TEXT, **{**BERT, "task": "encoder"})
    ids = torch.randint(0, 97, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 7:] = 0
    a = m(ids, attention_mask=mask).hidden_states
    junk = ids.clone()
    junk[0, 7:] = (junk[0, 7:] + 5) % 97
    b = m(junk, attention_mask=mask).hidden_states
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-12)
    assert torch.allclose(m(ids[:, :7]).hidden_states, a[:, :7], atol=1e-12)


def test_mlm_loss_counts_masked_positions_only_and_adds_nsp():
    m = model(**TEXT, **BERT, task="masked_lm", nsp=True)
    ids = torch.randint(0, 97, (3, 10))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5], labels[2, 9], labels[2, 0] = 4, 8, 15, 16
    nsp = torch.tensor([0, 1, 1])
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    out = m(ids, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    masked = labels != -100
    ref = F.cross_entropy(out.logits[masked], labels[masked]) + F.cross_entropy(out.nsp_logits, nsp)
    assert rel_err(out.loss, ref) < 1e-10
    assert out.pooled.shape == (3, 32) and out.nsp_logits.shape == (3, 2)


def test_text_classifier_pools_last_real_token():
    m = model(**TEXT, task="text_classification", pooling="last", num_labels=3)
    ids = torch.randint(0, 97, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    labels = torch.tensor([2, 0])
    out = m(ids, attention_mask=mask, labels=labels)
    assert torch.equal(out.pooled[0], out.hidden_states[0, 4]) and torch.equal(out.pooled[1], out.hidden_states[1, 7])
    assert rel_err(out.loss, F.cross_entropy(out.logits, labels)) < 1e-10


def test_image_classifier_reads_the_cls_state():
    m = model(**VIT, task="image_classification", num_labels=5)
    x, labels = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([1, 4])
    out = m(x, labels=labels)
    assert out.hidden_states.shape == (2, 17, 32)
    assert rel_err(out.logits, m.classifier(out.hidden_states[:, 0])) < 1e-12
    assert rel_err(out.loss, F.cross_entropy(out.logits, labels)) < 1e-10


def test_masked_image_modeling_loss_covers_masked_pixels_only():
    m = model(**VIT, task="masked_image_modeling")
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[0, [0, 5]] = True
    masked[1, 15] = True
    out = m(x, bool_masked_pos=masked)
    assert out.logits.shape == x.shape
    total, count = 0.0, 0
    for b in range(2):
        for p in masked[b].nonzero().flatten().tolist():
            r, c = divmod(p, 4)
            patch = (slice(None), slice(4 * r, 4 * r + 4), slice(4 * c, 4 * c + 4))
            total += (out.logits[b][patch] - x[b][patch]).abs().sum()
            count += 3 * 16
    assert rel_err(out.loss, total / count) < 1e-6  # the 1e-5 guard in the denominator
    # the prediction for one patch is the decoder applied to that patch's hidden state
    pred = m.decoder(out.hidden_states[0, 1 + 5]).view(3, 4, 4)
    assert rel_err(out.logits[0, :, 4:8, 4:8], pred) < 1e-12


def test_mask_token_replaces_masked_patches():
    m = model(**VIT, task="masked_image_modeling")
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    masked = torch.zeros(1, 16, dtype=torch.bool)
    masked[0, 3] = True
    y = x.clone()
    y[0, :, 0:4, 12:16] = 0.0  # change only patch 3's pixels
    a = m(x, bool_masked_pos=masked).hidden_states
    b = m(y, bool_masked_pos=masked).hidden_states
    assert torch.allclose(a, b, atol=1e-12)


def test_contrastive_loss_is_symmetric_info_nce():
    m = model(**TEXT, task="contrastive", causal=False, pooling="mean", temperature=0.1)
    ids = torch.randint(0, 97, (6, 9))
    out = m(ids, labels=torch.arange(3))
    emb = out.hidden_states.mean(1)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    sim = emb[:3] @ emb[3:].t() / 0.1
    ref = (F.cross_entropy(sim, torch.arange(3)) + F.cross_entropy(sim.t(), torch.arange(3))) / 2
    assert rel_err(out.loss, ref) < 1e-6


def test_every_parameter_gets_a_gradient():
    for kw in (TEXT, {**TEXT, **LLAMA, "tie_embeddings": False}):
        m = model(**kw)
        ids = torch.randint(0, 97, (2, 8))
        m(ids, labels=ids).loss.backward()
        missing = [n for n, p in m.named_parameters() if p.grad is None]
        assert not missing


def test_gqa_shrinks_key_value_projections():
    mha, gqa = model(**TEXT), model(**TEXT, n_kv_heads=1)
    assert mha.transformer.blocks[0].attn.qkv.weight.shape[0] == 3 * 32
    assert gqa.transformer.blocks[0].attn.qkv.weight.shape[0] == 32 + 2 * 8


def test_tied_embeddings_share_one_tensor():
    m = model(**TEXT)
    assert m.lm_head.weight is m.transformer.tok_embed.weight
    untied = model(**TEXT, tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.tok_embed.weight


def test_token_beyond_vocabulary_is_named():
    m = model(**TEXT)
    with pytest.raises(ValueError, match=r"token id 97 is outside the model's vocabulary \[0, 97\)"):
        m(torch.tensor([[1, 97, 2]]))


def test_sequence_longer_than_learned_positions_is_refused():
    m = model(**TEXT)
    with pytest.raises(ValueError, match="max_seq_len=32"):
        m(torch.randint(0, 97, (1, 33)))


def test_gradient_checkpointing_gives_the_same_gradients():
    m = model(**TEXT, **LLAMA)
    ids = torch.randint(0, 97, (2, 8))
    m(ids, labels=ids).loss.backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_gradient_checkpointing(True)
    m(ids, labels=ids).loss.backward()
    assert all(rel_err(p.grad, g) < 1e-12 for p, g in zip(m.parameters(), ref))

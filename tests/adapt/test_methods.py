"""LoRA, prefix and prompt tuning as model transforms: what they compute, what they freeze,
how they merge, fold and reload, and the errors for bad settings.

References: a float64 computation of the LoRA formula by hand; for prompt tuning the
untransformed model run on the prompt's tokens followed by the input; for prefixes the
same model without the KV cache (and unpadded inputs for padded ones)."""

import copy

import pytest
import torch

from llm.adapt import apply_transforms, lora, prefix
from llm.config import ConfigError
from llm.run.loader import load_model, save_pretrained
from tests.conftest import build, rel_err

GPT = dict(family="gpt", vocab_size=97, max_seq_len=40, d_model=32, n_layers=2, n_heads=4, d_ff=64)
GPT.update(norm="layernorm", position="learned", mlp="gelu_tanh", bias=True, tie_embeddings=True, causal=True)
LLAMA = dict(family="llama", vocab_size=97, max_seq_len=40, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2)
LLAMA.update(d_ff=40, norm="rmsnorm", position="rotary", mlp="swiglu", bias=False, tie_embeddings=False)
LLAMA.update(causal=True)
BERT = dict(family="bert", vocab_size=97, max_seq_len=40, d_model=32, n_layers=2, n_heads=4, d_ff=64)
BERT.update(norm="layernorm", norm_position="post", position="learned", mlp="gelu", bias=True, causal=False)
BERT.update(type_vocab_size=2, pooler=True, dropout=0.0, attention_dropout=0.0)

MODELS = {
    "gpt": lambda: build(GPT, dropout=0.0, attention_dropout=0.0),
    "llama-gqa": lambda: build(LLAMA),
    "bert-classifier": lambda: build(BERT, task="text_classification", num_labels=3),
}


def ids(batch=2, t=9, vocab=97):
    return torch.randint(0, vocab, (batch, t))


def randomize_adapters(model):
    """LoRA's B starts at zero; give every adapter values so that it changes the output."""
    with torch.no_grad():
        for _, layer in lora.adapted_layers(model):
            for _, _, _a, b in layer.lora_pairs():
                b.normal_(std=0.05)


# -- LoRA --------------------------------------------------------------------------------


def test_lora_layer_computes_the_low_rank_update_on_its_rows():
    """q and v of a GQA qkv: rows [0, q) and [q + kv, q + 2kv) gain (alpha/r) x A^T B^T, k's rows none."""
    model = apply_transforms(build(LLAMA), [{"name": "lora", "rank": 3, "alpha": 6, "targets": ["q", "v"]}])
    randomize_adapters(model)
    layer = model.transformer.blocks[1].attn.qkv
    x = torch.randn(5, 48)
    ref = x.double() @ layer.weight.double().T
    q, kv = 6 * 8, 2 * 8
    for key, rows in (("q", slice(0, q)), ("v", slice(q + kv, q + 2 * kv))):
        a, b = getattr(layer, f"lora_A_{key}").double(), getattr(layer, f"lora_B_{key}").double()
        ref[:, rows] += 2.0 * x.double() @ a.T @ b.T
    assert layer.lora_B_q.shape == (q, 3) and layer.lora_B_v.shape == (kv, 3)
    assert rel_err(layer(x), ref) < 1e-6


def test_lora_gradients_match_a_float64_reference():
    model = apply_transforms(build(LLAMA).double(), [{"name": "lora", "rank": 2, "targets": ["k", "v"]}])
    randomize_adapters(model)
    layer = model.transformer.blocks[0].attn.qkv
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    w_q = layer.weight[: 6 * 8]
    pieces = [x @ w_q.T]
    for key in ("k", "v"):
        rows = slice(*lora.slices_of(model, "transformer.blocks.0.attn.qkv")[key])
        a, b = getattr(layer, f"lora_A_{key}"), getattr(layer, f"lora_B_{key}")
        pieces.append(x @ layer.weight[rows].T + layer.scaling * (x @ a.T) @ b.T)
    ref = torch.cat(pieces, dim=-1)
    params = [layer.lora_A_k, layer.lora_B_k, layer.lora_A_v, layer.lora_B_v]
    want = torch.autograd.grad(ref.sin().sum(), params)
    got = torch.autograd.grad(layer(x).sin().sum(), params)
    assert all(rel_err(g, w) < 1e-10 for g, w in zip(got, want))


@pytest.mark.parametrize("name", list(MODELS))
def test_lora_trains_only_adapters_and_named_modules(name):
    model = MODELS[name]()
    targets = ["q", "k", "v", "proj", "fc_in", "fc_out"]
    trainable = ["classifier"] if name == "bert-classifier" else []
    apply_transforms(model, [{"name": "lora", "targets": targets, "trainable": trainable}])
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert train and all("lora_" in n or n.startswith("classifier.") for n in train)
    assert {"classifier.weight", "classifier.bias"} <= train or not trainable
    per_layer = 3 + 1 + 1 + 1  # q, k, v slices of qkv; proj; fc_in; fc_out
    assert sum(n.endswith("lora_A") or "lora_A_" in n for n in train) == per_layer * model.config.n_layers


@pytest.mark.parametrize("name", list(MODELS))
def test_lora_merged_gives_the_adapted_logits(name):
    model = MODELS[name]()
    targets = {"gpt": ["qkv", "fc_in"], "llama-gqa": ["q", "v", "proj", "fc_out", "gate"]}.get(name)
    targets = targets or ["qkv", "fc_in", "pooler.dense", "classifier"]
    apply_transforms(model, [{"name": "lora", "rank": 4, "alpha": 8, "targets": targets}])
    randomize_adapters(model)
    model.eval()
    x = ids()
    before = model(x).logits
    lora.merge(model)
    after = model(x).logits
    assert rel_err(after, before) < 1e-5
    assert not any("lora_" in n for n in model.state_dict())
    assert model.transforms == [] and type(model.transformer.blocks[0].attn.qkv) is torch.nn.Linear


def test_lora_on_an_untied_output_head_keeps_the_loss_fused():
    model = apply_transforms(build(LLAMA), [{"name": "lora", "targets": ["lm_head"], "rank": 2}])
    randomize_adapters(model)
    x = ids()
    out = model(x, labels=x)
    ref = torch.nn.functional.cross_entropy(out.logits.double().flatten(0, 1), x.flatten())
    assert rel_err(out.loss, ref) < 1e-6
    logits = out.logits
    lora.merge(model)
    assert rel_err(model(x).logits, logits) < 1e-5


def test_lora_reloads_from_a_model_directory(tmp_path):
    model = apply_transforms(build(GPT), [{"name": "lora", "targets": ["q", "v", "fc_in"], "dropout": 0.1}])
    randomize_adapters(model)
    model.eval()
    save_pretrained(model, tmp_path / "m")
    again = load_model(tmp_path / "m").eval()
    assert again.transforms == model.transforms
    x = ids()
    assert torch.equal(again(x).logits, model(x).logits)


def test_unknown_lora_target_is_one_clear_error():
    with pytest.raises(ConfigError) as e:
        apply_transforms(build(GPT), [{"name": "lora", "targets": ["q", "query_proj"]}])
    msg = str(e.value)
    assert "transforms[0].targets[1]" in msg and "'query_proj'" in msg
    assert "candidates: q, k, v, qkv, proj, fc_in, fc_out" in msg


def test_lora_on_a_tied_output_head_is_refused():
    with pytest.raises(ConfigError, match="tie_embeddings"):
        apply_transforms(build(GPT), [{"name": "lora", "targets": ["lm_head"]}])


# -- prefix tuning -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", [LLAMA, {**LLAMA, "n_kv_heads": 1}, GPT], ids=["gqa", "mqa", "gpt"])
def test_prefix_is_sized_by_key_value_heads_and_generates_as_without_cache(spec):
    model = apply_transforms(build(spec), [{"name": "prefix", "num_virtual_tokens": 5}])
    kv = model.transformer.prefix(3)
    assert len(kv) == 2 and kv[0][0].shape == (3, model.config.kv_heads, 5, model.config.head_dim)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["transformer.prefix.embedding.weight"]
    prompt = ids(2, 6)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding
    with_cache = model.generate(prompt, attention_mask=mask, max_new_tokens=8, temperature=0)
    without = model.generate(prompt, attention_mask=mask, max_new_tokens=8, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    # the padded row generates what it generates alone: positions and mask account for the prefix
    alone = model.generate(prompt[1:, 2:], max_new_tokens=8, temperature=0)
    assert torch.equal(with_cache[1, 2:], alone[0])


def test_prefix_positions_of_the_input_start_at_zero():
    """With a zero prefix value the keys still draw attention weight, but the input's own
    positions are those of the model without a prefix: explicit positions 0.. change nothing."""
    model = apply_transforms(build(GPT), [{"name": "prefix", "num_virtual_tokens": 4}]).eval()
    x = ids(2, 7)
    positions = torch.arange(7)[None]
    assert torch.equal(model(x).logits, model(x, position_ids=positions).logits)
    assert not torch.equal(model(x).logits, build(GPT).eval()(x).logits)


def test_reparameterized_prefix_folds_to_the_same_model(tmp_path):
    spec = {"name": "prefix", "num_virtual_tokens": 3, "reparameterize": True, "hidden_size": 16}
    model = apply_transforms(build(LLAMA), [spec]).eval()
    assert model.transformer.prefix.mlp is not None
    x = ids()
    before = model(x).logits
    prefix.fold(model)
    assert model.transformer.prefix.mlp is None and model.transforms[0]["reparameterize"] is False
    assert rel_err(model(x).logits, before) < 1e-6
    save_pretrained(model, tmp_path / "m")
    assert torch.equal(load_model(tmp_path / "m").eval()(x).logits, model(x).logits)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_beyond_the_position_table_are_one_clear_error(method):
    with pytest.raises(ConfigError) as e:
        apply_transforms(build(GPT), [{"name": method, "num_virtual_tokens": 40}])
    assert "transforms[0].num_virtual_tokens" in str(e.value) and "max_seq_len" in str(e.value)


# -- prompt tuning -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", [GPT, LLAMA, BERT], ids=["gpt", "llama", "bert"])
def test_soft_prompt_from_token_ids_equals_those_tokens_in_front(spec):
    """Initialised from ids z, the prompt-tuned model on x is the plain model on [z, x] (last T outputs)."""
    task = {"task": "masked_lm"} if spec is BERT else {}
    plain = build(spec, **task).eval()
    z = [5, 17, 3]
    model = apply_transforms(copy.deepcopy(plain), [{"name": "prompt", "num_virtual_tokens": 3, "init_ids": z}])
    x = ids(2, 8)
    ref = plain(torch.cat((torch.tensor([z, z]), x), dim=1)).logits[:, 3:]
    out = model(x)
    assert out.logits.shape[:2] == (2, 8)
    assert rel_err(out.logits, ref) < 1e-5


def test_soft_prompt_generation_with_cache_matches_recomputation():
    model = apply_transforms(build(LLAMA), [{"name": "prompt", "num_virtual_tokens": 4}])
    prompt = ids(2, 5)
    mask = torch.ones_like(prompt)
    mask[0, :1] = 0
    a = model.generate(prompt, attention_mask=mask, max_new_tokens=6, temperature=0)
    b = model.generate(prompt, attention_mask=mask, max_new_tokens=6, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_soft_prompt_classification_pools_the_real_first_token():
    model = apply_transforms(build(BERT, task="text_classification"), [{"name": "prompt", "num_virtual_tokens": 3}])
    model.eval()
    x = ids(2, 6)
    out = model(x, attention_mask=torch.ones_like(x))
    assert out.hidden_states.shape[1] == 6
    assert torch.equal(out.pooled, model.pooler(out.hidden_states[:, 0]))


def test_soft_prompt_from_text_records_its_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    spec = {
        "name": "prompt",
        "num_virtual_tokens": 5,
        "init_text": "w7 w9",
        "tokenizer": str(tmp_path / "tokenizer.json"),
    }
    model = apply_transforms(build(GPT), [spec])
    assert model.transforms[0]["init_ids"] == [7, 9] and "tokenizer" not in model.transforms[0]
    table = model.transformer.tok_embed.weight
    assert torch.equal(model.transformer.prompt.embedding.weight, table[[7, 9, 7, 9, 7]])
    save_pretrained(model, tmp_path / "m")
    (tmp_path / "tokenizer.json").unlink()
    x = ids()
    assert torch.equal(load_model(tmp_path / "m").eval()(x).logits, model.eval()(x).logits)


def test_a_soft_prompt_too_long_for_the_input_is_one_clear_error():
    model = apply_transforms(build(GPT), [{"name": "prompt", "num_virtual_tokens": 30}])
    with pytest.raises(ValueError, match="soft prompt"):
        model(ids(1, 12))


def test_methods_combine_without_freezing_each_other():
    specs = [{"name": "lora", "targets": ["q"]}, {"name": "prompt", "num_virtual_tokens": 2}]
    model = apply_transforms(build(GPT), specs)
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert train == {"transformer.prompt.embedding.weight"} | {
        f"transformer.blocks.{i}.attn.qkv.lora_{m}_q" for i in range(2) for m in "AB"
    }
    with pytest.raises(ConfigError, match="already carries a LoRA adapter"):
        apply_transforms(model, [{"name": "lora", "targets": ["blocks.0.attn.q"]}])
    one = apply_transforms(build(GPT), [{"name": "lora", "targets": ["blocks.1.attn.v", "blocks.0.mlp.fc_in"]}])
    assert sorted(n for n, p in one.named_parameters() if p.requires_grad) == [
        "transformer.blocks.0.mlp.fc_in.lora_A",
        "transformer.blocks.0.mlp.fc_in.lora_B",
        "transformer.blocks.1.attn.qkv.lora_A_v",
        "transformer.blocks.1.attn.qkv.lora_B_v",
    ]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_train_a_new_head_beside_them(method, tmp_path):
    """`trainable: [classifier]` keeps the new head training (PEFT's modules_to_save); the rest stays
    frozen, and the setting survives a reload; a name that matches nothing is one clear error."""
    model = MODELS["bert-classifier"]()
    spec = {"name": method, "num_virtual_tokens": 3, "trainable": ["classifier"]}
    apply_transforms(model, [spec])
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert train == {f"transformer.{method}.embedding.weight", "classifier.weight", "classifier.bias"}
    save_pretrained(model, tmp_path / "m")
    assert {n for n, p in load_model(tmp_path / "m").named_parameters() if p.requires_grad} == train
    with pytest.raises(ConfigError, match=r"^transforms\[0\]\.trainable\[0\]: 'score' matches no parameter"):
        apply_transforms(MODELS["bert-classifier"](), [{**spec, "trainable": ["score"]}])

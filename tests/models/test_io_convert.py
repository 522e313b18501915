"""llm model directories, `load_model` detection, and `llm convert` in both directions."""

import pytest
import torch

from llm.cli import main
from llm.data.tokenizer import Tokenizer
from llm.errors import UserError
from llm.run.loader import find_tokenizer, load_model, load_pretrained, save_pretrained
from tests.conftest import build
from tests.models.test_generation import train_tokenizer

TINY = dict(vocab_size=300, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)
BERT = dict(TINY, family="bert", task="masked_lm", nsp=True, causal=False, norm_position="post", type_vocab_size=2)
VIT = dict(family="vit", task="masked_image_modeling", causal=False, image_size=8, patch_size=4)
VIT.update(d_model=32, n_layers=1, n_heads=4, d_ff=64, mlp="gelu")


@pytest.mark.parametrize(
    "arch",
    [TINY, dict(TINY, tie_embeddings=False), dict(BERT, pooler=True), VIT],
    ids=["gpt-tied", "gpt-untied", "bert", "vit-mim"],
)
def test_save_and_load_pretrained_round_trip(arch, tmp_path):
    model = build(arch)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    if model.config.family == "gpt":  # tying survives the trip
        tied = loaded.lm_head.weight is loaded.transformer.tok_embed.weight
        assert tied == model.config.tie_embeddings


def test_load_model_detects_each_kind_and_names_bad_paths(tmp_path):
    model = build(TINY)
    save_pretrained(model, tmp_path / "llm")
    assert isinstance(load_model(tmp_path / "llm"), type(model))
    from llm.tasks.hf import to_hf

    to_hf(model, tmp_path / "hf")
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "hf")(ids).logits, model(ids).logits)

    with pytest.raises(UserError, match="missing: not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "llm" / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"llm/model\.safetensors: not found"):
        load_model(tmp_path / "llm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):  # neither a model nor a checkpoint
        load_model(tmp_path / "empty")


def test_load_pretrained_rejects_weights_that_do_not_fit(tmp_path):
    save_pretrained(build(TINY), tmp_path)
    (tmp_path / "config.yaml").write_text((tmp_path / "config.yaml").read_text().replace("d_ff: 64", "d_ff: 96"))
    with pytest.raises(UserError, match=r"mlp\.fc_in\.\w+ has shape"):
        load_pretrained(tmp_path)


def test_find_tokenizer_looks_up_to_the_run_directory(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_10"
    step.mkdir(parents=True)
    assert find_tokenizer(step) is None
    (tmp_path / "run" / "tokenizer.json").write_text("{}")
    assert find_tokenizer(step) == (tmp_path / "run" / "tokenizer.json").resolve()


def test_llm_convert_both_directions(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    ref = transformers.GPT2LMHeadModel(config).eval()
    ref.save_pretrained(tmp_path / "hf")
    vocab = train_tokenizer(tmp_path / "hf" / "tokenizer.json")

    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "llm")]) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("read Hugging Face directory") and "gpt causal_lm" in summary
    assert f"{sum(p.numel() for p in ref.parameters()):,} parameters" in summary
    assert (tmp_path / "llm" / "config.yaml").is_file()
    assert Tokenizer(tmp_path / "llm" / "tokenizer.json").vocab_size == vocab

    assert main(["convert", str(tmp_path / "llm"), str(tmp_path / "back"), "--to", "hf"]) == 0
    assert "(--to hf)" in capsys.readouterr().out
    assert Tokenizer(tmp_path / "back" / "tokenizer.json").vocab_size == vocab
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back")
    for name, tensor in ref.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    # the tokenizer and the special ids travel: AutoTokenizer names EOS, generate knows where to stop
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert tok.eos_token == "<|endoftext|>" and back.generation_config.eos_token_id == tok.eos_token_id == 0

    assert main(["generate", "--model", str(tmp_path / "back"), "--prompt", "the cat", "--max-new-tokens", "3",
                 "--temperature", "0", "--dtype", "bf16"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("the cat")

    (tmp_path / "hf" / "config.json").write_text('{"architectures": ["MambaForCausalLM"]}')
    capsys.readouterr()  # drop transformers' progress bars
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'MambaForCausalLM' is not supported" in err

"""Every model input is checked against the config: a clear error naming the input and the field,
never a raw shape error from deep inside; ViT's interpolate_pos_encoding matches transformers."""

import pytest
import torch

from llm.tasks.hf import from_hf
from tests.conftest import build, rel_err
from tests.models.test_hf import VIT, hf_model

transformers = pytest.importorskip("transformers")

VIT32 = {**VIT, "image_size": 32, "patch_size": 8, "encoder_stride": 8}


@pytest.mark.parametrize("arch, extra", [("ViTModel", {}), ("ViTForImageClassification", {"num_labels": 4})])
@pytest.mark.parametrize("size", [(48, 48), (24, 40), (32, 32)])
def test_vit_interpolate_pos_encoding_matches_transformers(arch, extra, size, tmp_path):
    ref = hf_model(arch, "ViTConfig", {**VIT32, **extra})
    ref.save_pretrained(tmp_path)
    ours = from_hf(tmp_path).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        want = ref(pixel_values=x, interpolate_pos_encoding=True)
        got = ours(pixel_values=x, interpolate_pos_encoding=True)
    if arch == "ViTModel":
        assert rel_err(got.hidden_states, want.last_hidden_state) < 1e-5
    else:
        assert rel_err(got.logits, want.logits) < 1e-5


def test_vit_inputs_that_do_not_fit_the_config_are_named():
    model = build(dict(family="vit", image_size=32, patch_size=8, d_model=16, n_layers=1, n_heads=2, d_ff=32),
                  task="encoder").eval()  # fmt: skip
    with pytest.raises(ValueError, match=r"image size 48x48 does not match the model's 32x32 .*interpolate_pos_enc"):
        model(pixel_values=torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="pixel_values have 1 channels, the model 3"):
        model(pixel_values=torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="pixel_values must be float"):
        model(pixel_values=torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pixel_values must be float .*shape \\(3, 32, 32\\)"):
        model(pixel_values=torch.randn(3, 32, 32))
    mim = build(dict(family="vit", image_size=32, patch_size=8, d_model=16, n_layers=1, n_heads=2, d_ff=32),
                task="masked_image_modeling").eval()  # fmt: skip
    with pytest.raises(ValueError, match="bool_masked_pos \\(1, 9\\) must hold one flag per patch \\(1, 16\\)"):
        mim(pixel_values=torch.randn(1, 3, 32, 32), bool_masked_pos=torch.zeros(1, 9, dtype=torch.bool))


def test_text_inputs_that_do_not_fit_the_config_are_named():
    lm = build(dict(family="gpt", vocab_size=50, max_seq_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=32)).eval()
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(ValueError, match="position 8 is beyond max_seq_len=8"):
        lm(torch.randint(0, 50, (2, 9)))
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\), got shape \(6,\)"):
        lm(ids[0])
    with pytest.raises(TypeError, match="input_ids must be integer token ids, got torch.float32"):
        lm(ids.float())
    with pytest.raises(ValueError, match="token id 50 is outside the model's vocabulary"):
        lm(torch.full((1, 3), 50))
    with pytest.raises(ValueError, match=r"attention_mask \(2, 5\) must be \(batch, seq\) = \(2, 6\)"):
        lm(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"labels \(2, 5\) must match input_ids \(2, 6\)"):
        lm(ids, labels=ids[:, :5])
    with pytest.raises(TypeError, match="labels must be integer"):
        lm(ids, labels=ids.float())
    with pytest.raises(ValueError, match=r"position_ids \(1, 4\) do not fit input_ids \(2, 6\)"):
        lm(ids, position_ids=torch.arange(4)[None])
    bert = build(dict(family="bert", vocab_size=50, max_seq_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                      norm_position="post", causal=False, type_vocab_size=2), task="masked_lm").eval()  # fmt: skip
    with pytest.raises(ValueError, match=r"token type 2 is outside \[0, 2\) \(model.type_vocab_size=2\)"):
        bert(ids, token_type_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match=r"token_type_ids \(2, 5\) must match input_ids \(2, 6\)"):
        bert(ids, token_type_ids=ids[:, :5].clamp(max=1))

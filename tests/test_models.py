"""The truncated runner reproduces the HF model's own hidden_states, for each supported family."""

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from tokdistill_fast.modeling.models import Decoder


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_hidden_states_match_hf(family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, 300), dtype=torch.float32).eval()
    dec = Decoder(model)
    ids = torch.randint(0, 300, (3, 17))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
        ours = dec.hidden_states(dec.embed(ids), [1, 2, 4])
    for layer in (1, 2, 4):
        torch.testing.assert_close(ours[layer], ref[layer], rtol=1e-5, atol=1e-5)


def test_gemma_embed_scale_applied():
    model = AutoModelForCausalLM.from_config(tiny_config("gemma3", 300), dtype=torch.float32)
    dec = Decoder(model)
    assert dec.embed_scale == pytest.approx(64 ** 0.5)
    ids = torch.tensor([[5, 6]])
    torch.testing.assert_close(dec.embed(ids), model.model.embed_tokens.weight[ids] * 64 ** 0.5)


def test_layer_indices():
    dec = Decoder(AutoModelForCausalLM.from_config(tiny_config("llama", 300)))
    assert dec.resolve_layer(-1) == 4 and dec.resolve_layer(2) == 2 and dec.resolve_layer(-4) == 1
    with pytest.raises(ValueError, match="outside"):
        dec.resolve_layer(0)
    with pytest.raises(ValueError, match="outside"):
        dec.resolve_layer(5)

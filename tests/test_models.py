"""The truncated runner reproduces the HF model's own hidden_states, for each supported family."""

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from tokdistill_fast.config import UserInputError
from tokdistill_fast.modeling import fused
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_check_refuses_what_the_passes_do_not_compute(dtype):
    """A model whose family's forward scales outside the layers (Granite's embedding multiplier and logit
    scaling, Cohere's logit scale) is refused in one line; the supported families pass, in fp32 and bf16."""
    from transformers import CohereConfig, GraniteConfig

    torch.manual_seed(0)
    small = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    for family in ("llama", "qwen2", "gemma3"):
        Decoder(AutoModelForCausalLM.from_config(tiny_config(family, 300), dtype=dtype).eval()).check_forward("ok")
    Decoder(AutoModelForCausalLM.from_config(GraniteConfig(**small), dtype=dtype).eval()).check_forward("ok")
    for config, where in ((GraniteConfig(**small, embedding_multiplier=12.0), "layer 1"),
                          (GraniteConfig(**small, logits_scaling=8.0), "the logits"),
                          (CohereConfig(**small), "the logits")):  # logit_scale 0.0625 by default
        dec = Decoder(AutoModelForCausalLM.from_config(config, dtype=dtype).eval())
        with pytest.raises(UserInputError, match=f"differ at {where}"):
            dec.check_forward("m")


def test_hybrid_and_sliding_models():
    """Hybrid models (LFM2's convolutions) are refused before any work; a window without layer types (Mistral)
    limits the sequences as Gemma-3's sliding layers do."""
    from transformers import Lfm2Config, MistralConfig

    small = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    with pytest.raises(UserInputError, match="unsupported model Lfm2ForCausalLM"):
        Decoder(AutoModelForCausalLM.from_config(Lfm2Config(**small, layer_types=["conv", "full_attention"])))
    assert Decoder(AutoModelForCausalLM.from_config(MistralConfig(**small, sliding_window=8))).max_len == 8
    assert Decoder(AutoModelForCausalLM.from_config(tiny_config("qwen2", 300))).max_len is None


def test_gemma2_is_refused_in_one_line(tmp_path):
    """Gemma-2's attention has no SDPA path in transformers: refused naming that, not with transformers' advice to
    load it eager (which no flag of ours does)."""
    from transformers import Gemma2Config

    from tokdistill_fast.modeling.models import load_model

    AutoModelForCausalLM.from_config(Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  head_dim=16)).save_pretrained(tmp_path)
    with pytest.raises(UserInputError, match=r"unsupported model: .*SDPA") as e:
        load_model(tmp_path, torch.device("cpu"), torch.float32, tokenizer=object())
    assert "eager" not in str(e.value)


def test_report_names_the_layer_kernels_that_ran():
    """report.json's implementations.layers says the C++ kernels ran only where a family's modules were swapped
    for them: Phi-3's norms, attention and MLP run Hugging Face's modules (its linears alone are packed)."""
    from transformers import Phi3Config

    from tokdistill_fast.control import observed

    phi3 = Phi3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    ids = torch.tensor([[5, 6, 7]])
    built = fused.extension() is not None  # without it (no compiler), Llama's layers run the references too
    for config, expected in ((tiny_config("llama", 300), "cpp" if built else "torch"), (phi3, "torch")):
        dec = Decoder(AutoModelForCausalLM.from_config(config).eval().requires_grad_(False))
        with observed.recording(), torch.no_grad():
            dec.check_forward("the model")  # a check at load: not what the job ran (--backend torch read "cpp")
            assert observed.ran("layers") is None
            dec.hidden_states(dec.embed(ids), [2])
            assert observed.ran("layers") == expected


FAMILIES = {  # the families README's Limitations lists as run: none of them computes anything around its layers
    "LlamaConfig": {}, "Qwen2Config": {}, "Qwen3Config": {"head_dim": 16}, "MistralConfig": {},
    "Qwen3MoeConfig": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "Gemma3TextConfig": {"head_dim": 16}, "SmolLM3Config": {"pad_token_id": 0},
    "GlmConfig": {"head_dim": 16, "pad_token_id": 0}, "Phi3Config": {"pad_token_id": 0}, "Olmo2Config": {},
    "GraniteConfig": {}}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_listed_families_pass_the_forward_check(name):
    import transformers

    config = getattr(transformers, name)(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, **FAMILIES[name])
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        Decoder(AutoModelForCausalLM.from_config(config, dtype=dtype).eval()).check_forward(name)


def test_layers_without_the_cpp_kernels_warn_once(monkeypatch, caplog):
    """A CPU whose C++ extension did not build runs the layers' references: one warning line per run says so and
    what it costs, as the aligner's does (before, silent: only report.json showed it)."""
    from tokdistill_fast.control import observed

    monkeypatch.setattr(fused, "extension", lambda: None)
    dec = Decoder(AutoModelForCausalLM.from_config(tiny_config("llama", 300)).eval().requires_grad_(False))
    ids = torch.tensor([[5, 6, 7]])
    with observed.recording(), torch.no_grad(), caplog.at_level("WARNING"):
        for _ in range(3):
            dec.hidden_states(dec.embed(ids), [2])
        assert observed.ran("layers") == "torch"
    assert caplog.text.count("C++ layer kernels not built") == 1


def test_the_log_says_what_the_model_computes_in(tmp_path, caplog):
    """The log names the loaded model, its size and the dtype it runs in, so `--dtype auto`'s pick is visible."""
    from tokdistill_fast.modeling.models import load_model

    AutoModelForCausalLM.from_config(tiny_config("llama", 300)).save_pretrained(tmp_path)
    with caplog.at_level("INFO", logger="tokdistill_fast"):
        load_model(tmp_path, torch.device("cpu"), torch.bfloat16, tokenizer=object())
    assert f"--model {tmp_path}: LlamaForCausalLM, 4 layers, hidden size 64, 300 embedding rows, bfloat16 on cpu" \
        in caplog.text


def test_a_hub_id_reads_its_snapshot_from_the_hugging_face_cache(model_dirs, words_file, corpus_file, tmp_path,
                                                                   monkeypatch, capsys):
    """--model owner/name, where no such directory exists, runs on that repository's snapshot in the Hugging Face
    cache (offline here: the hub is not reached); a repository the cache lacks, or a missing path that is no hub
    id, is refused in one line naming the flag."""
    import shutil

    from huggingface_hub import constants

    from tokdistill_fast.cli import main
    from tokdistill_fast.modeling.models import model_dir

    repo, commit = tmp_path / "hub" / "models--someone--tiny", "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dirs[("llama", "bytelevel", True)], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    assert model_dir("someone/tiny") == repo / "snapshots" / commit
    assert main(["-q", "distill", "--model", "someone/tiny", "--new-tokens", str(words_file), "--corpus",
                 str(corpus_file), "--method", "mean", "--out", "out"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    for name, reason in (("someone/other", "no such directory, and not a model the Hugging Face hub or its cache "
                                           "holds"), ("models/tiny-typo/", "not a directory")):
        assert main(["-q", "select", "--model", name, "--corpus", str(corpus_file), "--out", "w.txt"]) == 2
        assert capsys.readouterr().err.startswith(f"tokdistill: error: --model {name}: {reason}")


def test_a_hub_id_without_safetensors_fetches_its_bin_weights(tmp_path, monkeypatch):
    """The hub fetch asks for config, tokenizer and safetensors files; a repository with .bin weights only is asked
    again for those (a review found them left out, so the model would arrive without weights)."""
    import huggingface_hub

    from tokdistill_fast.modeling.models import local_dir

    asked = []

    def fetch(repo, allow_patterns):
        asked.append(allow_patterns)
        (tmp_path / "config.json").write_text("{}")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    assert local_dir("someone/old", "--model") == tmp_path
    assert len(asked) == 2 and "*.bin" not in asked[0] and "*.bin" in asked[1]
    (tmp_path / "model.safetensors").write_text("")
    asked.clear()
    local_dir("someone/new", "--model")
    assert len(asked) == 1

"""HF conversion: random-weight transformers models give the same logits after import and after export back."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import (config_from_hf, config_to_hf, from_hf_dir, from_hf_model, infer_family, is_hf_dir,
                              to_hf_dir)

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

V = 101
NO_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA = dict(vocab_size=V, hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, **NO_IDS)
HF_CONFIGS = {
    "gpt2-tied": lambda: transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=48, n_layer=3, n_head=4,
                                                 **NO_IDS),
    "gpt2-untied-relu": lambda: transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=40, n_layer=3, n_head=5,
                                                        n_inner=56, activation_function="relu",
                                                        tie_word_embeddings=False, **NO_IDS),
    "llama-gqa": lambda: transformers.LlamaConfig(**LLAMA, rope_theta=500.0),
    "llama-mqa-tied-bias": lambda: transformers.LlamaConfig(**dict(LLAMA, num_key_value_heads=1), attention_bias=True,
                                                            mlp_bias=True, tie_word_embeddings=True),
    "llama-head-dim": lambda: transformers.LlamaConfig(**dict(LLAMA, hidden_size=40), head_dim=6),
    "qwen2-bias": lambda: transformers.Qwen2Config(**dict(LLAMA, hidden_size=40, intermediate_size=56)),
    "mistral": lambda: transformers.MistralConfig(**LLAMA, sliding_window=4096),
}


def random_hf_model(name: str) -> torch.nn.Module:
    """A float32 eval-mode HF model whose weights (biases and norms too) are large enough for O(1) logits."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name]()).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name or ".ln_" in name else 0.0, 0.2)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded batch: (input_ids, attention_mask, position_ids)."""
    ids = torch.randint(0, V, (3, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[1, :4] = mask[2, :9] = False
    return ids, mask, (mask.long().cumsum(-1) - 1).clamp(min=0)


def assert_same_logits(ours: Transformer, hf: torch.nn.Module) -> None:
    ids, mask, pos = batch()
    with torch.no_grad():
        expected = hf(ids).logits
        assert expected.abs().max() > 1.0  # the comparison is not between near-zero numbers
        torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=0)
        padded = ours(ids, position_ids=pos, attention_mask=mask)
        expected = hf(ids, attention_mask=mask.long(), position_ids=pos).logits
        torch.testing.assert_close(padded[mask], expected[mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_import_and_export_match_transformers(tmp_path, name):
    hf = random_hf_model(name)
    ours = from_hf_model(hf).eval()
    assert_same_logits(ours, hf)

    to_hf_dir(ours, tmp_path)
    # without family=, a Mistral model is exported as the equivalent Llama
    exported_as = {"MistralForCausalLM": "LlamaForCausalLM"}.get(type(hf).__name__, type(hf).__name__)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [exported_as]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert_same_logits(ours, reloaded)
    assert from_hf_dir(tmp_path).config == ours.config


def test_mistral_export_on_request(tmp_path):
    ours = from_hf_model(random_hf_model("mistral")).eval()
    to_hf_dir(ours, tmp_path, family="mistral")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["sliding_window"] is None
    assert_same_logits(ours, transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval())


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_config_round_trip(preset):
    cfg = ModelConfig.preset(preset)
    assert config_from_hf(config_to_hf(cfg, infer_family(cfg))) == cfg
    qwen = ModelConfig.preset(preset, qkv_bias=True)
    assert infer_family(qwen) == ("gpt2" if preset == "tiny-gpt2" else "qwen2")


def test_sliding_window_caps_block_size():
    cfg = config_from_hf(transformers.MistralConfig(**dict(LLAMA, max_position_embeddings=4096), sliding_window=16))
    assert cfg.block_size == 16


def test_hub_style_gpt2_files_sharded_and_without_prefix(tmp_path):
    """Hub GPT-2 checkpoints name weights without 'transformer.' and carry attention-mask buffers."""
    hf = random_hf_model("gpt2-tied")
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    names = sorted(state)
    shards = {"model-1.safetensors": names[: len(names) // 2], "model-2.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    assert is_hf_dir(tmp_path)
    assert_same_logits(from_hf_dir(tmp_path).eval(), hf)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(LmforgeError, match="BertForMaskedLM.*GPT2LMHeadModel, LlamaForCausalLM"):
        config_from_hf({"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    with pytest.raises(LmforgeError, match="rope_type"):
        config_from_hf(dict(LLAMA, model_type="llama", rope_parameters={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(LmforgeError, match="norm_placement"):
        config_to_hf(ModelConfig.preset("tiny-llama", norm_placement="post"), "llama")
    with pytest.raises(LmforgeError, match="not a Hugging Face model dir"):
        from_hf_dir(tmp_path)

    to_hf_dir(from_hf_model(random_hf_model("llama-gqa")), tmp_path)
    assert is_hf_dir(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(48)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LmforgeError, match="q_proj.bias"):
        from_hf_dir(tmp_path)
    del state["model.norm.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(LmforgeError, match="missing tensor 'model.norm.weight'"):
        from_hf_dir(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LmforgeError, match="only safetensors"):
        from_hf_dir(tmp_path)


def test_lmforge_dir_is_not_hf_dir(tmp_path):
    Transformer(ModelConfig.preset("tiny-llama")).save(tmp_path)
    assert not is_hf_dir(tmp_path)

"""Parameter-efficient fine-tuning: LoRA on fused projections, merging, PEFT's format both ways (logits compared
with the `peft` library), prefix and prompt tuning through the KV cache, quantized bases, adapters, bad input."""

import json
from pathlib import Path

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.config import GenerationConfig
from lmforge.infer.generate import generate
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import to_hf_dir
from lmforge.peft.config import PeftConfig
from lmforge.peft.files import load_adapter, merge, wrap_base
from lmforge.peft.lora import LoRALinear
from lmforge.peft.peft_format import import_peft
from lmforge.peft.quant import NF4_LEVELS, QuantLinear

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.tensor([[5, 9, 2, 41, 7, 33, 18, 3], [8, 1, 60, 12, 4, 4, 90, 21]])


def tiny(style: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    extra = {"n_kv_head": 2} if style == "llama" else {}
    cfg = ModelConfig.preset(f"tiny-{style}", vocab_size=97, block_size=64, d_model=32, **{**extra, **overrides})
    return Transformer(cfg).eval()


def saved_base(tmp_path: Path, style: str) -> tuple[Path, Path]:
    """An lmforge model dir and its Hugging Face export."""
    model = tiny(style)
    model.save(tmp_path / f"{style}-base")
    to_hf_dir(model, tmp_path / f"{style}-hf")
    return tmp_path / f"{style}-base", tmp_path / f"{style}-hf"


def randomized(model, seed: int = 1):
    """Give every trainable parameter random values (B starts at zero, which would hide wrong key names)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.trainable_parameters().values():
            param.copy_(torch.randn_like(param) * 0.2)
    return model.eval()


def adapted(base_dir: Path, cfg: PeftConfig):
    from lmforge.convert import load

    return randomized(wrap_base(load(base_dir), cfg, str(base_dir)))


def hf_logits(model, ids: torch.Tensor, virtual: int = 0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return logits[:, virtual:]


# ---- LoRA itself ---------------------------------------------------------------------------------------------

def test_lora_starts_at_the_base_and_adapts_only_its_rows():
    base = tiny("llama")
    reference = base(IDS).detach()
    model = wrap_base(tiny("llama"), PeftConfig(method="lora", targets=["q", "v"], r=4), "unused")
    assert torch.allclose(model(IDS), reference, atol=1e-6)  # B = 0
    qkv = model.base.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and set(qkv.rows) == {"q", "v"}
    trainable = model.trainable_parameters()
    assert all(".lora_" in name for name in trainable) and len(trainable) == 2 * 2 * 2  # A, B x q, v x 2 layers
    randomized(model)
    x = torch.randn(3, 32)
    delta = qkv(x) - qkv.base(x)
    q, kv = qkv.rows["q"][1], model.base.config.n_kv_head * model.base.config.head_dim
    assert delta[:, :q].abs().max() > 0 and delta[:, q:q + kv].abs().max() == 0  # k untouched
    assert delta[:, q + kv:].abs().max() > 0


@pytest.mark.parametrize("style, targets", [("llama", ["q", "v", "o", "gate", "up", "down"]), ("gpt2", ["qkv", "up"])])
def test_merge_gives_a_plain_model_with_the_same_logits(tmp_path, style, targets):
    base_dir, _ = saved_base(tmp_path, style)
    model = adapted(base_dir, PeftConfig(method="lora", targets=targets, r=4, alpha=8, rslora=True))
    expected = model(IDS).detach()
    merged = merge(model)
    assert type(merged) is Transformer and not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert torch.allclose(merged(IDS), expected, atol=1e-5)


# ---- PEFT's format both ways ---------------------------------------------------------------------------------

@pytest.mark.parametrize("style, targets", [("llama", ["q", "v"]), ("llama", ["k", "o", "gate", "up", "down"]),
                                            ("gpt2", ["q", "v"]), ("gpt2", ["qkv", "o", "up", "down"])])
def test_exported_lora_loads_in_peft_with_equal_logits(tmp_path, style, targets):
    base_dir, hf_dir = saved_base(tmp_path, style)
    model = adapted(base_dir, PeftConfig(method="lora", targets=targets, r=4, alpha=8))
    model.save(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (style == "gpt2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    base_logits = hf_logits(hf, IDS)
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(hf_logits(loaded, IDS), model(IDS), atol=1e-4)
        assert (model(IDS) - base_logits).abs().max() > 1e-2  # the adapter does change the logits


@pytest.mark.parametrize("style, modules", [("llama", ["q_proj", "v_proj", "o_proj", "down_proj"]),
                                            ("gpt2", ["c_attn", "c_fc"])])
def test_a_peft_made_lora_adapter_imports_with_equal_logits(tmp_path, style, modules):
    base_dir, hf_dir = saved_base(tmp_path, style)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    made = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, target_modules=modules, init_lora_weights=False,
                                                   fan_in_fan_out=style == "gpt2")).eval()
    made.save_pretrained(tmp_path / "peft-adapter")
    for base in (base_dir, hf_dir):  # on the lmforge dir or the Hugging Face dir of the same weights
        out = import_peft(tmp_path / "peft-adapter", base, tmp_path / f"imported-{base.name}")
        ours = load_adapter(out)
        assert torch.allclose(ours(IDS), hf_logits(made, IDS), atol=1e-4)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_tuning_match_peft_both_ways(tmp_path, style, method):
    base_dir, hf_dir = saved_base(tmp_path, style)
    model = adapted(base_dir, PeftConfig(method=method, virtual_tokens=5))
    model.save(tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    virtual = 5 if method == "prompt" else 0  # prompt tuning returns logits for the virtual tokens too
    assert torch.allclose(hf_logits(loaded, IDS, virtual), model(IDS), atol=1e-4)
    back = load_adapter(import_peft(tmp_path / "adapter", base_dir, tmp_path / "imported"))
    assert torch.allclose(back(IDS), model(IDS), atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt", "lora", "adapter"])
def test_generation_through_the_kv_cache_equals_full_recomputation(tmp_path, method):
    base_dir, _ = saved_base(tmp_path, "llama")
    model = adapted(base_dir, PeftConfig(method=method, virtual_tokens=4, targets=["q", "v", "down"]))
    prompts = [[5, 9, 2], [8, 1, 60, 12, 4]]
    cached = generate(model, prompts, GenerationConfig(max_new_tokens=10, temperature=0, eos=False))
    full = generate(model, prompts, GenerationConfig(max_new_tokens=10, temperature=0, eos=False, use_cache=False))
    assert [c.token_ids for c in cached] == [c.token_ids for c in full]
    assert model.config.block_size == 64 - (4 if method in ("prefix", "prompt") else 0)


def test_prompt_tuning_can_start_from_a_text():
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train(["classify the sentiment of this review"] * 20, vocab_size=300)
    base = Transformer(ModelConfig.preset("tiny-llama", vocab_size=tok.vocab_size, block_size=64, d_model=32))
    ids = tok.encode("classify the sentiment")
    model = wrap_base(base, PeftConfig(method="prompt", virtual_tokens=len(ids) + 2,
                                       prompt_init_text="classify the sentiment"), "unused", tokenizer=tok)
    expected = base.tok_emb.weight[torch.tensor((ids * 2)[:len(ids) + 2])]
    assert torch.equal(model.prompt.embedding.detach(), expected.detach())


# ---- quantized bases and adapters ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, tolerance", [("int8", 0.01), ("nf4", 0.2)])
def test_quantized_projections_stay_close_to_the_weights(kind, tolerance):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48)
    quant = QuantLinear(linear, kind, group_size=64)
    error = (quant.weight - linear.weight).abs().max() / linear.weight.abs().max()
    assert 0 < error < tolerance
    x = torch.randn(4, 128)
    assert torch.allclose(quant(x), x @ quant.weight.t() + linear.bias, atol=1e-5)
    if kind == "nf4":
        assert quant.codes.dtype == torch.uint8 and quant.codes.shape == (48, 64)  # two codes a byte
        normalized = quant.weight / quant.scales.repeat_interleave(64, dim=1)
        assert torch.isclose(normalized[..., None], NF4_LEVELS, atol=1e-5).any(-1).all()


@pytest.mark.parametrize("method, quantize", [("qlora", "nf4"), ("qlora", "int8"), ("adapter", "nf4")])
def test_quantized_and_adapter_methods_train_only_their_parameters(method, quantize):
    model = wrap_base(tiny("llama"), PeftConfig(method=method, quantize=quantize, targets=["q", "v"], group_size=16,
                                                adapter_size=8), "unused").train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(list(model.trainable_parameters().values()), lr=1e-2)
    targets = torch.roll(IDS, -1, dims=1)
    losses = []
    for _ in range(20):
        loss = model(IDS, targets=targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


# ---- bad input ---------------------------------------------------------------------------------------------

def test_bad_peft_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown target 'query' for this model \(valid: q, k, v, qkv, o, gate, up, down\)"):
        wrap_base(tiny("llama"), PeftConfig(method="lora", targets=["query"]), "unused")
    with pytest.raises(ConfigError, match=r"peft.r=0: expected > 0"):
        PeftConfig(method="lora", r=0)
    with pytest.raises(ConfigError, match=r"peft.r=64: the rank must be in 1..16 for target 'v'"):
        wrap_base(tiny("llama"), PeftConfig(method="lora", targets=["v"], r=64), "unused")


def test_an_adapter_is_never_applied_to_another_base(tmp_path):
    base_dir, _ = saved_base(tmp_path, "llama")
    adapted(base_dir, PeftConfig(method="lora", r=4)).save(tmp_path / "adapter")
    tiny("llama", seed=5).save(tmp_path / "other")  # the same shapes, other weights
    with pytest.raises(LmforgeError, match="trained on another base model \\(the weights' fingerprint"):
        load_adapter(tmp_path / "adapter", base_dir=tmp_path / "other")
    tiny("llama", d_ff=96).save(tmp_path / "wider")
    with pytest.raises(LmforgeError, match=r"config differs in d_ff \(128 vs 96\)"):
        load_adapter(tmp_path / "adapter", base_dir=tmp_path / "wider")

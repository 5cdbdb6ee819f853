"""Weight-only quantization for inference (lmforge.infer.quant): int8 rows and int4 groups on worked tensors, the
packing, the kernel path against the dequantize path, quantized tiny models against fp32, generation, the LM head
option, sizes, save/load, bad input."""

import copy

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer import compiled
from lmforge.infer.generate import GenerationConfig, generate
from lmforge.infer.quant import (Int4Linear, Int8Linear, dequantize_int4, load_quantized, pack_int4,
                                 quantize_int4, quantize_model, quantized_size_bytes, save_quantized, size_summary,
                                 unpack_int4)
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Linear, Transformer

GREEDY = dict(temperature=0.0, eos=False)


def tiny(style: str = "llama", seed: int = 0, **overrides) -> Transformer:
    """tiny-llama: d_model 64, q/k/v 128 rows (GQA 4/2), SwiGLU d_ff 192, untied; tiny-gpt2: biases, tied head."""
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(f"tiny-{style}", vocab_size=256, block_size=64, init_std=0.1, **overrides)
    return Transformer(cfg).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- int8 and int4 on worked tensors -----------------------------------------------------------------------

def test_int8_rows_keep_their_absmax_and_round_to_the_nearest_step():
    weight = torch.tensor([[2.54, -1.0, 0.0, 0.5] * 4, [0.0, 0.01, -0.127, 0.05] * 4])  # (2, 16)
    layer = Int8Linear(_linear(weight))
    assert torch.allclose(layer.scales, torch.tensor([0.02, 0.001]))  # absmax / 127 per row
    assert layer.codes[0, :4].tolist() == [127, -50, 0, 25] and layer.codes[1, :4].tolist() == [0, 10, -127, 50]
    assert torch.allclose(layer.weight, weight, rtol=0, atol=1e-6)  # every value here is on its row's grid


def test_int4_groups_quantize_their_own_range():
    wide = torch.linspace(-1.0, 1.0, 32)  # group 0: min -1, max 1 -> step 2/15
    narrow = torch.linspace(0.0, 0.15, 32)  # group 1: step 0.01
    constant = torch.full((32,), 0.5)  # group 2: no range at all
    weight = torch.cat([wide, narrow, constant])[None].repeat(16, 1)  # (16, 96), three groups of 32 per row
    codes, scales, zeros = quantize_int4(weight, group_size=32)
    assert codes.dtype == torch.uint8 and codes.shape == (16, 96) and scales.shape == zeros.shape == (16, 3)
    assert codes[0, 0] == 0 and codes[0, 31] == 15 and codes[0, 63] == 15  # each group's min and max: ends of 0..15
    restored = dequantize_int4(codes, scales, zeros, torch.float32)
    error = (restored - weight).abs()[0]
    assert error[:32].max() <= 1 / 15 * 1.01  # half of group 0's step (2/15), bf16 scale rounding aside
    assert error[32:64].max() <= 0.005 * 1.01  # group 1 keeps its own, 13x finer step
    assert torch.equal(restored[:, 64:], weight[:, 64:])  # a constant group comes back exactly


def test_int4_codes_pack_two_per_byte_in_both_layouts():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 32)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # the even column in the low nibble
    assert torch.equal(unpack_int4(packed), codes)
    weight = torch.randn(48, 64)
    layer = Int4Linear(_linear(weight), group_size=32)
    assert layer.kernel_layout and layer.packed.shape == (48, 32)  # the CPU kernel's tiles: half a byte a weight
    assert torch.equal(layer.codes(), quantize_int4(weight, 32)[0])  # read back exactly through the kernel
    assert torch.equal(layer.state_dict()["packed"], pack_int4(layer.codes()))  # state dicts hold the plain layout


def test_bad_shapes_and_settings_are_one_line_errors():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (lambda: quantize_int4(torch.randn(16, 48), 32), "int4: in_features 48 is not a multiple of group_size 32"),
        (lambda: quantize_int4(torch.randn(16, 64), 16), "int4 group_size 16: expected one of 32, 64, 128, 256"),
        (lambda: quantize_model(model, "int3"), "quantize scheme 'int3': expected 'int8' or 'int4'"),
        (lambda: quantize_model(model, "int4", group_size=128), "in_features 64 is not a multiple of group_size 128"),
        (lambda: quantize_model(torch.nn.Linear(4, 4), "int8"), "expected an lmforge Transformer, got Linear"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as error:
            call()
        assert message in str(error.value) and "\n" not in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a refused model is untouched
    quantize_model(model, "int8")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, "int4")


# ---- products: kernel against dequantize ---------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 8, 40])
def test_kernel_path_equals_the_dequantize_path(scheme, rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)  # with a bias
    layer = Int8Linear(linear) if scheme == "int8" else Int4Linear(linear, group_size=32)
    x = torch.randn(2, rows, 64)  # (B, T, in)
    with torch.no_grad():
        exact = x @ layer.weight.t() + linear.bias  # the dequantized weight, fp32
        dequantized, kernel = layer.forward_dequantized(x), layer.forward_kernel(x)
    assert kernel.shape == dequantized.shape == (2, rows, 96) and kernel.dtype == torch.float32
    assert relative_error(dequantized, exact) < 1e-5
    assert relative_error(kernel, exact) < 1e-2  # the kernels take bf16 inputs (8 bits of mantissa)


def test_layers_choose_the_kernel_by_rows_and_shape():
    torch.manual_seed(0)
    int8, int4 = Int8Linear(torch.nn.Linear(64, 96)), Int4Linear(torch.nn.Linear(64, 96), 32)
    with torch.no_grad():
        few, many = torch.randn(Int8Linear.KERNEL_MAX_ROWS, 64), torch.randn(Int8Linear.KERNEL_MAX_ROWS + 1, 64)
        assert torch.equal(int8(few), int8.forward_kernel(few))
        assert torch.equal(int8(many), int8.forward_dequantized(many))
        assert torch.equal(int4(many), int4.forward_kernel(many))  # int4 on the CPU: the kernel at any row count
        odd_in = Int8Linear(torch.nn.Linear(40, 96))  # in_features % 16: the kernel returned wrong sums
        x = torch.randn(1, 40)
        assert torch.equal(odd_in(x), odd_in.forward_dequantized(x))
        odd_out = Int4Linear(torch.nn.Linear(64, 40), 32)  # out_features % 16: no tiled layout, dequantized
        assert not odd_out.kernel_layout and torch.equal(odd_out(few), odd_out.forward_dequantized(few))
        with pytest.raises(ConfigError, match="out_features a multiple of 16"):
            odd_out.forward_kernel(few)
        assert int8(few.bfloat16()).dtype == torch.bfloat16


# ---- quantized models --------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_quantized_logits_stay_close_to_fp32(style):
    model = tiny(style)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids)
        errors = {(scheme, g, head): relative_error(quantize_model(copy.deepcopy(model), scheme, g, head)(ids),
                                                    reference)
                  for scheme, g, head in [("int8", 32, True), ("int8", 32, False), ("int4", 32, True),
                                          ("int4", 32, False), ("int4", 64, True)]}
    assert errors[("int8", 32, True)] < 0.04  # measured 0.015-0.021 (random weights amplify errors through layers)
    assert errors[("int4", 32, True)] < 0.4  # measured 0.17-0.25
    assert errors[("int4", 32, False)] < errors[("int4", 32, True)] < errors[("int4", 64, True)]
    assert errors[("int8", 32, False)] < errors[("int8", 32, True)] < errors[("int4", 32, False)]


def test_the_head_option_and_the_sizes():
    model = tiny()
    fp32_bytes = quantized_size_bytes(model)
    assert fp32_bytes == 4 * model.num_parameters()
    kept = quantize_model(copy.deepcopy(model), "int4", 32, include_head=False)
    assert type(kept.lm_head) is Linear and kept.quantization == {"scheme": "int4", "group_size": 32,
                                                                  "include_head": False}
    whole = quantize_model(copy.deepcopy(model), "int4", 64)
    assert isinstance(whole.lm_head, Int4Linear) and isinstance(whole.blocks[1].mlp.down, Int4Linear)
    summary = size_summary(whole)
    assert summary["bits_per_weight"] == 4 + 32 / 64  # half a byte per weight + a bf16 scale and zero per group
    assert summary["full_precision_bytes"] == 4 * (model.tok_emb.weight.numel() + 64 * 5)  # embedding, 5 norms
    assert summary["bytes"] == quantized_size_bytes(whole) < quantized_size_bytes(kept) < fp32_bytes
    int8 = size_summary(quantize_model(copy.deepcopy(model), "int8"))
    assert 8 < int8["bits_per_weight"] < 8.6  # a byte per weight + an fp32 scale per row
    with torch.no_grad():  # the fused loss reads lm_head.weight: the dequantized head
        ids = torch.randint(0, 256, (2, 16))
        logits = whole(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        assert torch.allclose(whole(ids[:, :-1], targets=ids[:, 1:]), loss, atol=2e-2)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_greedy_generation_on_a_quantized_model(scheme, monkeypatch):
    # one product path at every row count: the bf16 kernel and the fp32 dequantize path round differently, and a
    # random tiny model has near-ties that a rounding flips
    monkeypatch.setattr(Int8Linear, "KERNEL_MAX_ROWS", 1000)
    model = quantize_model(tiny(), scheme)
    prompts = [[5, 17, 99, 3, 250], [42, 7], [9]]  # left-padded to 5 columns
    cfg = GenerationConfig(max_new_tokens=12, **GREEDY)
    cached = [c.token_ids for c in generate(model, prompts, cfg)]
    assert [len(ids) for ids in cached] == [12, 12, 12]
    uncached = generate(model, prompts, GenerationConfig(max_new_tokens=12, use_cache=False, **GREEDY))
    assert [c.token_ids for c in uncached] == cached
    assert [generate(model, [prompts[1]], cfg)[0].token_ids] == cached[1:2]  # a padded row decodes as alone


def test_save_and_load_a_quantized_model(tmp_path):
    model = quantize_model(tiny("gpt2"), "int4", 32, include_head=False)  # tied head kept: saved once
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    tiny().save(tmp_path / "plain")  # a full-precision model dir
    with pytest.raises(LmforgeError, match="quantization.json not found: expected a dir written by save_quantized"):
        load_quantized(tmp_path / "plain")
    with pytest.raises(ConfigError, match="not quantized"):
        save_quantized(tiny(), tmp_path / "plain")


def test_moves_keep_int4_layers_consistent():
    model = quantize_model(tiny(), "int4")
    layer = model.blocks[0].attn.qkv
    codes = layer.codes()
    model.float()  # scales and zeros stay bf16, the layout stays the kernel's
    assert layer.scales_and_zeros.dtype == torch.bfloat16 and layer.kernel_layout
    assert torch.equal(layer.codes(), codes)
    model.to("meta")  # off the CPU: the plain layout, dequantized products
    assert not layer.kernel_layout and layer.packed.device.type == "meta"


@pytest.mark.slow  # one AOTInductor compile, 30-45 s on 2 cores
def test_compiled_decoding_runs_the_quantized_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    compiled._compiled.clear()
    model = quantize_model(tiny(n_layer=1), "int4", include_head=False)
    model.lm_head = Int8Linear(model.lm_head)  # int4 blocks and an int8 head: both kernels in one compile
    prompts = [[5, 17, 99, 3, 250], [42, 7]]
    eager = generate(model, prompts, GenerationConfig(max_new_tokens=8, **GREEDY))
    compiled_ids = generate(model, prompts, GenerationConfig(max_new_tokens=8, compile=True, **GREEDY))
    assert [c.token_ids for c in compiled_ids] == [c.token_ids for c in eager]


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    return linear


def test_generate_chat_and_eval_take_the_quantize_options(model_dir, tmp_path, capsys):
    from lmforge.cli import main

    args = ["generate", str(model_dir), "--prompt", "the cat", "--max_new_tokens", "4", "--temperature", "0"]
    assert main(args + ["--quantize", "int8"]) == 0
    assert main(args + ["--quantize", "int4", "--quant_group_size", "32", "--quant_head", "false"]) == 0
    assert main(args + ["--quantize", "int8", "--prompt_lookup", "2"]) == 0  # speculative on quantized weights
    assert main(args + ["--quantize", "int4", "--draft", str(model_dir)]) == 0  # target and draft quantized
    capsys.readouterr()
    assert main(args + ["--quantize", "int3"]) == 2
    assert "int8 or int4" in capsys.readouterr().err
    assert main(args + ["--quantize", "int4", "--quant_group_size", "48"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    text = tmp_path / "held-out.txt"
    text.write_text("the cat sat on the mat. a dog is a friend. " * 8)
    report = tmp_path / "eval.json"
    assert main(["eval", str(model_dir), "--text", str(text), "--quantize", "int8", "--out", str(report)]) == 0
    assert report.is_file()


def test_a_quantized_model_is_saved_with_save_quantized_only(tmp_path):
    torch.manual_seed(0)
    model = quantize_model(Transformer(ModelConfig.preset("tiny-llama", vocab_size=64, block_size=16,
                                                          d_model=64)), "int8")
    with pytest.raises(LmforgeError, match="save_quantized"):
        model.save(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()

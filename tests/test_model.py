"""Transformer and KVCache: shapes, causality, cache and padding equivalence, persistence, accounting."""

import pytest
import torch
from safetensors.torch import load_file

from lmforge.errors import LmforgeError, PromptTooLongError
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.model import transformer as transformer_module

torch.set_num_threads(1)

V = 61
GPT2 = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, d_model=32, norm="layernorm", positions="learned",
            mlp="gelu_tanh", bias=True, tie_embeddings=True)
LLAMA = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32, multiple_of=16)
VARIANTS = {
    "gpt2": GPT2,
    "llama-gqa": LLAMA,
    "llama-mqa": dict(LLAMA, n_kv_head=1, tie_embeddings=True),
    "llama-mha": dict(LLAMA, n_kv_head=4, rope_theta=500.0),
    "qwen2-qkv-bias": dict(LLAMA, qkv_bias=True),
    "post-ln-relu": dict(GPT2, norm_placement="post", mlp="relu", tie_embeddings=False),
    "post-ln-rope-geglu": dict(LLAMA, norm_placement="post", mlp="geglu"),
    "gelu-head-dim": dict(LLAMA, mlp="gelu", head_dim=12, norm="layernorm"),
}


def make(name: str, **overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**VARIANTS[name], **overrides})).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_and_backward(name):
    model = make(name).train()
    logits = model(tokens(3, 11))
    assert logits.shape == (3, 11, V) and logits.dtype == torch.float32
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(name):
    """Recomputing activations in backward must not change anything, dropout included (its RNG is replayed)."""
    grads = []
    for checkpointing in (False, True):
        model = make(name, dropout=0.1).train()
        model.activation_checkpointing = checkpointing
        torch.manual_seed(5)
        loss = model(tokens(3, 11)).logsumexp(-1).mean()
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_off, grads_off), (loss_on, grads_on) = grads
    assert torch.equal(loss_off, loss_on)
    assert all(torch.allclose(a, b, atol=1e-7, rtol=0) for a, b in zip(grads_off, grads_on))


@pytest.mark.parametrize("name", VARIANTS)
def test_future_tokens_do_not_change_past_logits(name):
    model = make(name)
    x = tokens(2, 12)
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % V
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_decoding_equals_full_forward(name):
    model = make(name)
    x = tokens(2, 14)
    cache = model.new_kv_cache(batch_size=2, max_len=20)
    with torch.no_grad():
        full = model(x)
        steps = [model(x[:, :5], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache) for t in range(5, 14)]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of a left-padded batch."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, width - len(row):], mask[b, width - len(row):] = row, True
    return ids, mask, (mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "post-ln-rope-geglu"])
def test_left_padded_batch_equals_single_rows(name):
    model = make(name)
    rows = [tokens(1, n, seed=n)[0] for n in (9, 4, 7)]
    ids, mask, pos = left_pad(rows)
    with torch.no_grad():
        batched = model(ids, position_ids=pos, attention_mask=mask)
        for b, row in enumerate(rows):
            torch.testing.assert_close(batched[b, -len(row):], model(row[None])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama-mqa"])
def test_left_padded_decoding_with_cache_equals_single_rows(name):
    model = make(name)
    rows = [tokens(1, n, seed=n)[0] for n in (8, 3)]
    ids, mask, pos = left_pad(rows)
    new = tokens(2, 4, seed=99)
    cache = model.new_kv_cache(2, 16)
    with torch.no_grad():
        outs = [model(ids, position_ids=pos, attention_mask=mask, kv_cache=cache)[:, -1:]]
        for t in range(4):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
            pos = pos[:, -1:] + 1
            outs.append(model(new[:, t:t + 1], position_ids=pos, attention_mask=mask, kv_cache=cache))
        decoded = torch.cat(outs, dim=1)  # logits after the prompt and after each new token
        for b, row in enumerate(rows):
            full = model(torch.cat([row, new[b]])[None])[0, len(row) - 1:]
            torch.testing.assert_close(decoded[b], full, atol=1e-5, rtol=0)


def test_kv_cache_bounds_reset_and_crop():
    model = make("llama-gqa")
    cache = model.new_kv_cache(1, 6)
    assert cache.k.shape == (2, 1, 2, 6, 8) and isinstance(cache, KVCache)
    model(tokens(1, 4), kv_cache=cache)
    with pytest.raises(PromptTooLongError):
        model(tokens(1, 3), kv_cache=cache)
    cache.crop(2)
    assert cache.length == 2
    with pytest.raises(ValueError):
        cache.crop(3)
    cache.reset()
    assert cache.length == 0
    with pytest.raises(PromptTooLongError):
        model(tokens(1, 33))


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    gqa = make("llama-gqa")
    mha = make("llama-gqa", n_kv_head=4)
    state = gqa.state_dict()
    for i in range(2):
        w = state[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([32, 16, 16])  # head_dim 8: 4 query heads, 2 kv heads
        # kv head j serves query heads 2j and 2j+1
        k, v = (t.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32) for t in (k, v))
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    x = tokens(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=0)


def test_gqa_without_sdpa_enable_gqa(monkeypatch):
    model = make("llama-gqa")
    x = tokens(2, 9)
    with torch.no_grad():
        expected = model(x)
        monkeypatch.setattr(transformer_module, "_SDPA_HAS_GQA", False)
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


def test_post_ln_has_no_final_norm():
    names = make("post-ln-relu").state_dict().keys()
    assert "blocks.0.mlp_norm.weight" in names and not any(n.startswith("norm.") for n in names)


def test_parameter_count_matches_formula():
    d, L, P, ff = 32, 2, 32, 128
    layernorm = 2 * d
    gpt2_layer = 2 * layernorm + (d * 3 * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d)
    gpt2 = make("gpt2")
    assert gpt2.num_parameters() == V * d + P * d + L * gpt2_layer + layernorm
    assert gpt2.num_parameters(exclude_embeddings=True) == L * gpt2_layer + layernorm

    llama = make("llama-gqa")
    ff = llama.config.d_ff  # 8/3 * 32 rounded up to a multiple of 16
    assert ff == 96
    llama_layer = 2 * d + d * (32 + 2 * 16) + d * d + d * 2 * ff + ff * d
    assert llama.num_parameters() == 2 * V * d + L * llama_layer + d
    n_flops = L * llama_layer + d + V * d
    assert llama.flops_per_token(16) == 6 * n_flops + 12 * L * d * 16
    assert gpt2.flops_per_token(16) == 6 * (L * gpt2_layer + layernorm + V * d) + 12 * L * d * 16


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_save_and_from_dir_round_trip(tmp_path, name):
    model = make(name)
    model.save(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in stored) == (not model.config.tie_embeddings)
    loaded = Transformer.from_dir(tmp_path).eval()
    assert loaded.config == model.config
    x = tokens(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.tok_emb.weight


def test_from_dir_errors(tmp_path):
    with pytest.raises(LmforgeError, match="config.json"):
        Transformer.from_dir(tmp_path)
    make("llama-gqa").save(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LmforgeError, match="model.safetensors"):
        Transformer.from_dir(tmp_path)
    make("llama-gqa", d_model=48).save(tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").rename(tmp_path / "model.safetensors")
    with pytest.raises(LmforgeError, match="wrong shape"):
        Transformer.from_dir(tmp_path)


@pytest.mark.parametrize("rows", [1, 8, 40])
def test_linear_keeps_an_input_major_weight_and_blocks_few_row_products(rows):
    torch.manual_seed(0)
    layer = transformer_module.Linear(16, 2 * transformer_module.Linear.BLOCK + 100, bias=True)  # widening
    assert layer.weight.shape == (layer.out_features, 16) and layer.weight.stride() == (1, layer.out_features)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(rows, 1, 16)
    with torch.no_grad():  # rows 2..32 take the column-block path
        assert torch.allclose(layer(x), x @ layer.weight.t() + layer.bias, atol=1e-5)
    state = layer.state_dict()
    other = transformer_module.Linear(16, layer.out_features)
    other.load_state_dict(state)
    assert torch.equal(other.weight, layer.weight) and other.weight.stride() == layer.weight.stride()
    assert transformer_module.Linear(32, 16).weight.is_contiguous()  # narrowing weights keep the (out, in) order

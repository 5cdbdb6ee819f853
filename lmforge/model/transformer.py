"""Transformer: one configurable decoder-only language model, built from a ModelConfig.

GPT-2 (learned positions, LayerNorm, gelu_tanh, biases, tied embeddings) and LLaMA (RoPE, RMSNorm, SwiGLU, no
bias, untied) are two settings of the same class; Qwen2 adds q/k/v biases, Mistral is LLaMA. Heads: MHA, GQA and
MQA through `n_kv_head`. Attention is torch's scaled_dot_product_attention.

Norm placement:
  pre  (GPT-2, LLaMA):             x = x + attn(norm(x));  x = x + mlp(norm(x));  final norm before the head.
  post (original Transformer/BERT): x = norm(x + attn(x)); x = norm(x + mlp(x));  no final norm (the last
                                    sublayer already ends with one).

State-dict names (the on-disk format of model.safetensors; lm_head.weight is absent when embeddings are tied):
  tok_emb.weight (V, d)                      pos_emb.weight (block_size, d)      [learned positions only]
  blocks.{i}.attn_norm.{weight,bias}         blocks.{i}.mlp_norm.{weight,bias}   [bias: layernorm with bias only]
  blocks.{i}.attn.qkv.{weight,bias}          ((n_head + 2 n_kv_head) head_dim, d), rows [q; k; v]
  blocks.{i}.attn.proj.{weight,bias}         (d, n_head head_dim)
  blocks.{i}.mlp.up.{weight,bias}            (d_ff, d), or (2 d_ff, d) rows [gate; up] for swiglu/geglu
  blocks.{i}.mlp.down.{weight,bias}          (d, d_ff)
  norm.{weight,bias}                         [pre-LN only]
  lm_head.weight (V, d)                      [untied only]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmforge.errors import ConfigError, LmforgeError, PromptTooLongError
from lmforge.io import load_safetensors
from lmforge.model.config import ModelConfig
from lmforge.model.kv_cache import KVCache
from lmforge.model.fused_loss import linear_cross_entropy, token_logprobs

# torch >= 2.5 repeats K/V heads inside SDPA; older versions need an explicit repeat_interleave.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 like HF LLaMA."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one call: decoding pays per operation (~47 vs ~59 us for 4 ops written out)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and shapes) tuned for few-row products with MKL on the CPU, which are most of
    a decoding step (measured with bench/bench_decode.py and the microbenchmarks in dev/LOG.md):

    - a widening weight (out > in: q/k/v, the MLP's up projection, the LM head) is kept in (in, out) memory order,
      like GPT-2's Conv1D, so y = x @ W^T reads a contiguous (in, out) matrix: ~1.3x faster at 1 and 8 rows. A
      narrowing one (attention output, MLP down) is faster in the usual (out, in) order and keeps it. Training's
      large matmuls run at the same speed either way. Saved files are unchanged (state dicts are written
      contiguous) and load_state_dict copies into the layout;
    - without autograd, an input of 2..32 rows times a wide weight (decoding a batch: the LM head, the gated MLP's
      up projection) is multiplied in column blocks of BLOCK outputs: MKL packs the whole weight for every
      few-row product, and blocks that fit the cache took 15-55% off an (8 x 512) @ (512 x 8192) product. Not
      when traced by torch.compile or torch.export: Inductor packs the whole weight itself (lmforge.infer.compiled).
    """

    BLOCK = 1024

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if out_features > in_features:
            self.weight = nn.Parameter(self.weight.detach().t().contiguous().t())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if (1 < rows <= 32 and self.out_features >= 2 * self.BLOCK and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            return torch.cat([F.linear(x, self.weight[j:j + self.BLOCK],
                                       None if self.bias is None else self.bias[j:j + self.BLOCK])
                              for j in range(0, self.out_features, self.BLOCK)], dim=-1)
        return F.linear(x, self.weight, self.bias)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and signed sin tables (max_len, head_dim) for rotary positions, in HF's layout (angles repeated [f; f]):

        cos = [cos f; cos f],   sin = [-sin f; sin f]

    The sign folded into sin turns HF's rotate_half(x) * sin = [-x2; x1] * [sin f; sin f] into [x2; x1] * sin:
    the same products, one operation fewer.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, head_dim/2)
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., head_dim) by position: x * cos + [x2; x1] * sin, pairs (i, i + head_dim/2), with cos and
    the signed sin of `rope_tables` broadcast to x."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention with a fused q/k/v projection and n_kv_head <= n_head key/value heads."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_size, self.kv_size = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.qkv = Linear(cfg.d_model, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.proj = Linear(self.q_size, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]], mask: Optional[Tensor], is_causal: bool,
                kv_cache: Optional[KVCache]) -> Tensor:
        B, T, _ = x.shape
        heads = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)  # rows [q; k; v]
        qk, v = heads.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=2)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k heads rotated together
        q, k = qk.split([self.n_head, self.n_kv_head], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, n_kv_head, S, head_dim)
        gqa = {}
        if self.n_kv_head != self.n_head:
            if _SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:
                k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, n_head, S, head_dim)
                v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0, **gqa)
        y = y.transpose(1, 2).reshape(B, T, self.q_size)  # (B, T, n_head * head_dim)
        return self.proj(y)


class MLP(nn.Module):
    """down(act(up(x))), or down(act(gate(x)) * up(x)) for gated MLPs with gate/up fused into one matrix."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.gated_mlp
        self.up = Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=cfg.bias)
        self.down = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.act = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu,
                    "swiglu": F.silu, "geglu": F.gelu}[cfg.mlp]

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # each (B, T, d_ff)
            return self.down(self.act(gate) * up)
        return self.down(self.act(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.attn_norm, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]], mask: Optional[Tensor], is_causal: bool,
                kv_cache: Optional[KVCache]) -> Tensor:
        if self.pre_norm and not self.dropout:  # the common case, without the Dropout module calls
            x = x + self.attn(self.attn_norm(x), rope, mask, is_causal, kv_cache)
            return x + self.mlp(self.mlp_norm(x))
        if self.pre_norm:
            x = x + self.drop(self.attn(self.attn_norm(x), rope, mask, is_causal, kv_cache))
            return x + self.drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.drop(self.attn(x, rope, mask, is_causal, kv_cache)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


class Transformer(nn.Module):
    """Decoder-only language model. See the module docstring for the layout and the state-dict names."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ConfigError("model.vocab_size is not set (pretrain takes it from the dataset; elsewhere give it)")
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity()
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Recompute each block's activations during backward instead of keeping them (training only): memory for
        # activations drops from one set per layer to one layer's, for about one extra forward pass of compute.
        self.activation_checkpointing = False
        if cfg.positions == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, residual projections scaled by 1/sqrt(2 n_layer)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.down):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    # ---- forward -------------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, kv_cache: Optional[KVCache] = None,
                targets: Optional[Tensor] = None, document_ids: Optional[Tensor] = None,
                per_token: bool = False) -> Tensor:
        """Logits (B, T, vocab_size) in the compute dtype; with `targets`, the mean cross-entropy instead, or with
        per_token the log-probability of each target (B, T), 0 where it is -100 (preference and RL objectives).

        input_ids (B, T). position_ids (B, T), default past + arange(T) where past = kv_cache.length (0 without a
        cache); explicit position ids are not range-checked. attention_mask (B, past + T), True = real token,
        covers cached and new keys; or a boolean (B, 1, T, past + T), True = query t may attend key s, used as
        given instead of the causal rule (tree attention). With a cache, new keys/values are written at
        [past, past + T) and kv_cache.length advances by T. targets (B, T), -100 where no loss is taken: the loss
        is computed with the LM head fused into the cross-entropy (lmforge.model.fused_loss), so the (B, T, V)
        logits are never materialized; it goes through forward so that DDP, FSDP and torch.compile wrappers see
        it. document_ids (B, T) packs several sequences in a row: a token attends only to earlier tokens of the
        same document id (give position_ids restarting at 0 per document), so each document is computed as if it
        were alone.
        """
        hidden = self.hidden_states(input_ids, position_ids, attention_mask, kv_cache, document_ids)
        if targets is not None and per_token:
            return token_logprobs(hidden, self.lm_head.weight, targets)
        if targets is not None:
            return linear_cross_entropy(hidden, self.lm_head.weight, targets)
        return self.lm_head(hidden)

    def hidden_states(self, input_ids: Optional[Tensor], position_ids: Optional[Tensor] = None,
                      attention_mask: Optional[Tensor] = None, kv_cache: Optional[KVCache] = None,
                      document_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None) -> Tensor:
        """The last layer's output (B, T, d_model) after the final norm, before the LM head (for value heads).

        inputs_embeds (B, T, d_model) replaces the token embeddings of input_ids (soft prompts)."""
        B, T = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
        device = (input_ids if inputs_embeds is None else inputs_embeds).device
        past = kv_cache.length if kv_cache is not None else 0
        if kv_cache is not None and B != kv_cache.batch_size:
            raise ValueError(f"input batch size {B} does not match the KV cache's {kv_cache.batch_size}")
        if kv_cache is not None and past + T > kv_cache.max_len:
            raise PromptTooLongError(f"{past} cached + {T} new positions exceed the KV cache's max_len "
                                     f"{kv_cache.max_len}")
        if position_ids is None:
            if past + T > self.config.block_size:
                raise PromptTooLongError(f"{past + T} positions exceed the model's block_size "
                                         f"{self.config.block_size}")
            position_ids = torch.arange(past, past + T, device=device).unsqueeze(0)  # (1, T)
        mask, is_causal = self._attention_mask(attention_mask, past, T, device)
        if document_ids is not None:  # packed documents: (B, 1, T, past + T), causal within each document only;
            # the `past` cached positions (a learned prefix) are visible to every document
            same = document_ids[:, None, :, None] == document_ids[:, None, None, :]
            within = same & torch.ones(T, T, dtype=torch.bool, device=device).tril()
            if past:
                within = torch.cat([torch.ones(B, 1, T, past, dtype=torch.bool, device=device), within], dim=-1)
            mask = within if mask is None else within & mask
            is_causal = False

        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d_model)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        else:
            rope = (self.rope_cos[position_ids].unsqueeze(2), self.rope_sin[position_ids].unsqueeze(2))  # (B,T,1,hd)
        x = self.drop(x)
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing:
                x = checkpoint(block, x, rope, mask, is_causal, kv_cache, use_reentrant=False)
            else:
                x = block(x, rope, mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(x)

    @staticmethod
    def _attention_mask(attention_mask: Optional[Tensor], past: int, T: int,
                        device: torch.device) -> tuple[Optional[Tensor], bool]:
        """(mask, is_causal) for SDPA. mask is boolean (B, 1, T, past + T) or (T, past + T), True = may attend.

        The fast paths pass no mask: is_causal when queries and keys align, nothing for one new token. A 4-D
        attention_mask (B, 1, T, past + T) is an explicit mask, used as given (no causal rule added): tree
        attention, where a node sees the cached prefix and its own ancestors only (lmforge.infer.medusa).
        """
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.shape[-2:] != (T, past + T):
                raise ValueError(f"a 4-D attention_mask must be (B, 1, {T}, {past + T}) (new x cached + new "
                                 f"positions), got shape {tuple(attention_mask.shape)}")
            return attention_mask.bool(), False
        if attention_mask is None and past == 0:
            return None, True
        if attention_mask is None and T == 1:
            return None, False
        S = past + T
        query_pos = torch.arange(past, S, device=device).unsqueeze(1)  # (T, 1)
        key_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
        allowed = key_pos <= query_pos  # (T, S)
        if attention_mask is not None:
            if attention_mask.shape[-1] != S:
                raise ValueError(f"attention_mask must cover {S} key positions (cached + new), "
                                 f"got shape {tuple(attention_mask.shape)}")
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
            # A padding query would see no key at all and SDPA would return NaN, which then leaks through
            # 0 * NaN into real rows of later layers; letting it see itself keeps it finite (and unused).
            allowed = allowed | (key_pos == query_pos)
        return allowed, False

    # ---- accounting ------------------------------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights once); exclude_embeddings drops token and position tables.

        With tied embeddings the shared matrix counts as an embedding; an untied lm_head is never excluded.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            n -= self.pos_emb.weight.numel() if self.pos_emb is not None else 0
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at context seq_len, PaLM/nanoGPT convention:

            6 * N + 12 * n_layer * (n_head * head_dim) * seq_len

        N counts every weight that is multiplied by an activation: all non-embedding parameters plus the LM
        head matrix (V * d, also when tied); embedding lookups are free. The second term is attention's
        QK^T and AV matmuls (2 FLOPs per multiply-add, x3 for backward) over the full, unmasked context.
        """
        cfg = self.config
        tied_head = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0  # an untied head is already counted
        n = self.num_parameters(exclude_embeddings=True) + tied_head
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    def new_kv_cache(self, batch_size: int, max_len: int, device: Optional[torch.device | str] = None,
                     dtype: Optional[torch.dtype] = None) -> KVCache:
        """An empty KVCache for this model; device and dtype default to the model's."""
        weight = self.tok_emb.weight
        return KVCache(self.config.n_layer, batch_size, max_len, self.config.n_kv_head, self.config.head_dim,
                       device=device or weight.device, dtype=dtype or weight.dtype)

    def generate(self, prompts: Any = None, cfg: Any = None, tokenizer: Any = None, *, input_ids: Any = None,
                 eos_id: Any = None, **kwargs: Any) -> Any:
        """lmforge.infer.generate.generate(self, prompts, cfg, tokenizer, eos_id=...): a list of Completions.

        Takes the keyword arguments users bring from transformers as well as a GenerationConfig: `input_ids=`
        for the prompts, `eos_token_id=` for eos_id, and max_new_tokens=, temperature=, top_k=, top_p=,
        do_sample=, repetition_penalty=, seed=, stop= adjust `cfg` (GenerationConfig.from_transformers).
        """
        from lmforge.infer.config import GenerationConfig
        from lmforge.infer.generate import generate

        prompts = input_ids if prompts is None else prompts
        eos_id = kwargs.pop("eos_token_id", None) if eos_id is None else eos_id
        if kwargs:
            cfg = GenerationConfig.from_transformers(cfg, **kwargs)
        return generate(self, prompts, cfg, tokenizer, eos_id=eos_id)

    # ---- persistence -----------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors into `directory`, each atomically; tied weights saved once."""
        from lmforge.io import save_safetensors

        if getattr(self, "quantization", None):  # set by lmforge.infer.quant.quantize_model
            raise LmforgeError("this model's weights are quantized: a model dir holds full-precision weights; save "
                               "it with lmforge.infer.quant.save_quantized(model, directory)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            del state["lm_head.weight"]
        save_safetensors(state, directory / WEIGHTS_FILE)
        self.config.save(directory / CONFIG_FILE)

    @classmethod
    def from_dir(cls, directory: str | Path, device: Optional[torch.device | str] = None) -> "Transformer":
        """Load a model dir written by `save`. Raises LmforgeError if a file is missing or does not match."""
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise LmforgeError(f"{directory / name} not found: expected an lmforge model dir "
                                   f"({CONFIG_FILE} + {WEIGHTS_FILE})")
        model = cls(ModelConfig.load(directory / CONFIG_FILE))
        model.load_weights(load_safetensors(directory / WEIGHTS_FILE), source=str(directory / WEIGHTS_FILE))
        return model.to(device) if device is not None else model

    def saved_mismatch(self, directory: str | Path) -> Optional[str]:
        """What differs between this model's config and the one saved in `directory` ('n_layer (saved 2, now
        4), ...'), or None when they are the same (resuming checks a checkpoint with it)."""
        if not (Path(directory) / CONFIG_FILE).is_file():
            return f"{directory} holds no {CONFIG_FILE} (it was not written by a full fine-tuning run)"
        saved, ours = ModelConfig.load(Path(directory) / CONFIG_FILE).to_dict(), self.config.to_dict()
        differs = [f"{k} (saved {saved.get(k)!r}, now {v!r})" for k, v in ours.items() if saved.get(k) != v]
        return ", ".join(differs) or None

    def load_saved(self, directory: str | Path) -> None:
        """Load the weights `save` wrote into `directory`."""
        path = Path(directory) / WEIGHTS_FILE
        self.load_weights(load_safetensors(path), source=str(path))

    def load_weights(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Copy an lmforge state dict (lm_head.weight optional when tied) into the model, checking names and shapes."""
        state = dict(state)
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)
            state["lm_head.weight"] = state.get("tok_emb.weight")
        expected = self.state_dict()
        missing = sorted(k for k in expected if state.get(k) is None)
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in expected if k not in missing and state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            details = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}" for what, keys in
                                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
            raise LmforgeError(f"{source} does not match the model config ({details})")
        self.load_state_dict(state)

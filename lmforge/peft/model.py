"""PeftModel: a frozen base Transformer with one parameter-efficient method, used like the Transformer itself by
the training loop, generation, chat and eval.

- lora / qlora / adapter replace projections inside the base (lmforge.peft.lora, .quant, .adapters);
- prefix / prompt put P virtual tokens before the input (lmforge.peft.prompts): real tokens take positions
  P, P + 1, ..., the attention mask gains P leading columns, and the context left for real tokens is
  block_size - P, which `config.block_size` reports.

Only the method's parameters train and only they are saved (lmforge.peft.files): checkpoints of a PEFT run hold
the adapter, not the base, and resume exactly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.model.fused_loss import linear_cross_entropy, token_logprobs
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import Transformer
from lmforge.peft.adapters import apply_adapters
from lmforge.peft.config import PeftConfig
from lmforge.peft.lora import apply_lora
from lmforge.peft.prompts import PrefixCache, PrefixEncoder, RecordingCache, SoftPrompt, text_init
from lmforge.peft.quant import QuantLinear


def quantize_base(model: Transformer, kind: str, group_size: int) -> None:
    """Store every block projection of `model` quantized (QuantLinear), in place."""
    for block in model.blocks:
        for owner, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "up"), (block.mlp, "down")):
            setattr(owner, name, QuantLinear(getattr(owner, name), kind, group_size))


class PeftModel(nn.Module):
    """See the module docstring. `tokenizer` is needed only for prompt tuning initialized from a text."""

    def __init__(self, base: Transformer, cfg: PeftConfig, tokenizer: Any = None) -> None:
        super().__init__()
        if cfg.method == "none":
            raise ConfigError("peft.method=none is full fine-tuning: use the model itself")
        self.base, self.peft = base, cfg
        for param in base.parameters():
            param.requires_grad_(False)
        self.prefix: Optional[PrefixEncoder] = None
        self.prompt: Optional[SoftPrompt] = None
        if cfg.method == "qlora":
            quantize_base(base, cfg.quantize, cfg.group_size)
        if cfg.method in ("lora", "qlora"):
            apply_lora(base, cfg.targets, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, cfg.rank_pattern,
                       cfg.alpha_pattern)
        elif cfg.method == "adapter":
            apply_adapters(base, cfg.adapter_size)
        elif cfg.method == "prefix":
            self.prefix = PrefixEncoder(base.config, cfg.virtual_tokens, cfg.prefix_projection, cfg.prefix_hidden)
        elif cfg.method == "prompt":
            init = None
            if cfg.prompt_init_text:
                if tokenizer is None:
                    raise ConfigError("peft.prompt_init_text needs the model's tokenizer")
                init = text_init(base.tok_emb.weight, tokenizer.encode(cfg.prompt_init_text), cfg.virtual_tokens)
            self.prompt = SoftPrompt(base.config, cfg.virtual_tokens, init)
        self.virtual = cfg.virtual_tokens if cfg.method in ("prefix", "prompt") else 0
        if self.virtual >= base.config.block_size:
            raise ConfigError(f"peft.virtual_tokens={self.virtual} leaves no context (block_size "
                              f"{base.config.block_size})")
        self.config = dataclasses.replace(base.config, block_size=base.config.block_size - self.virtual)

    # ---- what the loop and generation use ---------------------------------------------------------------------

    @property
    def activation_checkpointing(self) -> bool:
        return self.base.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.base.activation_checkpointing = value

    @property
    def lm_head(self) -> nn.Module:
        return self.base.lm_head

    @property
    def blocks(self) -> nn.ModuleList:
        return self.base.blocks

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def quantized_weights(self) -> int:
        """Weights the base stores quantized (buffers, not parameters, yet multiplied like any weight)."""
        return sum(m.in_features * m.out_features for m in self.base.modules() if isinstance(m, QuantLinear))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """The base's parameters (quantized weights included) and the method's."""
        extra = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("base."))
        return self.base.num_parameters(exclude_embeddings) + self.quantized_weights() + extra

    def flops_per_token(self, seq_len: int) -> int:
        return self.base.flops_per_token(seq_len + self.virtual) + 6 * self.quantized_weights()

    def virtual_keys_values(self, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer (key, value) of the virtual tokens, (B, n_kv_head, P, head_dim) each: the learned prefix, or
        the soft prompt run through the frozen model (its tokens attend only to one another, so this equals
        prepending the embeddings, and every document of a packed row sees the prompt)."""
        dtype = self.base.tok_emb.weight.dtype
        if self.prefix is not None:
            return self.prefix.keys_values(batch_size, dtype)
        recorder = RecordingCache()
        positions = torch.arange(self.virtual, device=self.prompt.embedding.device).unsqueeze(0)
        self.base.hidden_states(None, positions, kv_cache=recorder,
                                inputs_embeds=self.prompt.expand(1).to(dtype))
        return [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in recorder.layers]

    def new_kv_cache(self, batch_size: int, max_len: int, device: Optional[torch.device | str] = None,
                     dtype: Optional[torch.dtype] = None) -> KVCache:
        """A cache with room for the virtual tokens too, which it already holds (length P)."""
        cache = self.base.new_kv_cache(batch_size, max_len + self.virtual, device, dtype)
        if self.virtual:
            with torch.no_grad():
                for layer, (k, v) in enumerate(self.virtual_keys_values(batch_size)):
                    cache.k[layer, :, :, :self.virtual] = k
                    cache.v[layer, :, :, :self.virtual] = v
            cache.advance(self.virtual)
        return cache

    def hidden_states(self, input_ids: Tensor, position_ids: Optional[Tensor] = None,
                      attention_mask: Optional[Tensor] = None, kv_cache: Any = None,
                      document_ids: Optional[Tensor] = None) -> Tensor:
        """The base's hidden states of the real tokens (B, T, d_model), the virtual tokens before them (in
        `kv_cache` when generating: see new_kv_cache)."""
        if not self.virtual:
            return self.base.hidden_states(input_ids, position_ids, attention_mask, kv_cache, document_ids)
        B, T = input_ids.shape
        device = input_ids.device
        past = 0 if kv_cache is None else kv_cache.length - self.virtual
        if kv_cache is None:
            kv_cache = PrefixCache(self.virtual_keys_values(B))
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device).unsqueeze(0).expand(B, T)
        if attention_mask is not None:
            attention_mask = torch.cat([torch.ones(B, self.virtual, dtype=torch.bool, device=device),
                                        attention_mask.bool()], dim=1)
        return self.base.hidden_states(input_ids, position_ids + self.virtual, attention_mask, kv_cache,
                                       document_ids)

    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, kv_cache: Any = None,
                targets: Optional[Tensor] = None, document_ids: Optional[Tensor] = None,
                per_token: bool = False) -> Tensor:
        """Logits of the real tokens (B, T, V), or with targets the mean cross-entropy, or with per_token the
        targets' log-probabilities (as Transformer.forward)."""
        hidden = self.hidden_states(input_ids, position_ids, attention_mask, kv_cache, document_ids)
        if targets is not None and per_token:
            return token_logprobs(hidden, self.base.lm_head.weight, targets)
        if targets is not None:
            return linear_cross_entropy(hidden, self.base.lm_head.weight, targets)
        return self.base.lm_head(hidden)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """As Transformer.generate."""
        return Transformer.generate(self, *args, **kwargs)

    # ---- persistence (lmforge.peft.files) ---------------------------------------------------------------------

    def load_weights(self, state: dict[str, Tensor], source: str = "adapter") -> None:
        """Load the trainable parameters (names as `trainable_parameters`); anything missing or extra is an
        error naming it."""
        from lmforge.errors import LmforgeError

        expected = self.trainable_parameters()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            details = "; ".join(f"{what}: {', '.join(keys[:4])}" for what, keys in
                                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
            raise LmforgeError(f"{source} does not match the model and its peft settings ({details})")
        with torch.no_grad():
            for name, param in expected.items():
                param.copy_(state[name])

    def save(self, directory: Any) -> None:
        from lmforge.peft.files import save_adapter

        save_adapter(self, directory)

    def saved_mismatch(self, directory: Any) -> Optional[str]:
        """What differs between this model (base config, peft settings) and the adapter saved in `directory`."""
        from lmforge.peft.files import ADAPTER_CONFIG, read_adapter_config

        if not (Path(directory) / ADAPTER_CONFIG).is_file():
            return f"{directory} holds no {ADAPTER_CONFIG} (it was not written by a run with a peft method)"
        meta = read_adapter_config(directory)
        ours, base = dataclasses.asdict(self.peft), self.base.config.to_dict()
        differs = [f"peft.{k} (saved {meta['peft'].get(k)!r}, now {v!r})" for k, v in ours.items()
                   if meta["peft"].get(k) != v]
        differs += [f"{k} (saved {v!r}, now {base.get(k)!r})" for k, v in meta["base_config"].items()
                    if base.get(k) != v]
        return ", ".join(differs) or None

    def load_saved(self, directory: Any) -> None:
        from lmforge.io import load_safetensors
        from lmforge.peft.files import ADAPTER_WEIGHTS

        path = Path(directory) / ADAPTER_WEIGHTS
        self.load_weights(load_safetensors(path), source=str(path))


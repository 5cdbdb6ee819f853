"""The GPU path: parity on the device, flash attention, bf16 autocast, fused AdamW, compiled pretraining.

Every test here needs CUDA and skips cleanly without it (CI has no GPU; these run on a lent GPU machine).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import build_config
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import config_to_hf, to_hf_state_dict
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizer, param_groups
from lmforge.stages.pretrain import PretrainConfig, pretrain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture
def no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_match_transformers_on_the_gpu(family, no_tf32):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.preset("tiny-llama" if family == "llama" else "tiny-gpt2", vocab_size=1000)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    hf_class = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel}[family]
    hf = hf_class._from_config(config_to_hf(cfg, family), attn_implementation="sdpa")
    hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    if cfg.tie_embeddings:
        hf.tie_weights()
    ours, hf = ours.to(CUDA).eval(), hf.to(CUDA).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 100), device=CUDA)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_bf16_flash_attention_matches_the_math_kernel():
    """The model's attention runs on the flash kernel in bf16 (this raises if SDPA cannot use it) and agrees with
    the reference math kernel, forward and backward, within bf16 rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny-llama", vocab_size=1000, d_model=128, n_head=2, n_kv_head=1, block_size=256)
    model = Transformer(cfg).to(CUDA)
    ids = torch.randint(0, cfg.vocab_size, (2, 256), device=CUDA)
    targets = torch.randint(0, cfg.vocab_size, (2, 256), device=CUDA)
    results = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
        model.zero_grad(set_to_none=True)
        with sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, targets=targets)
        loss.backward()
        results[name] = (loss.detach(), model.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(results["flash"][0], results["math"][0], rtol=1e-2)
    grad_flash, grad_math = results["flash"][1], results["math"][1]
    assert (grad_flash - grad_math).norm() / grad_math.norm() < 3e-2


def test_bf16_autocast_loss_is_close_to_fp32(no_tf32):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny-llama", vocab_size=1000)).to(CUDA)
    ids = torch.randint(0, 1000, (4, 128), device=CUDA)
    targets = torch.randint(0, 1000, (4, 128), device=CUDA)
    with torch.no_grad():
        full = model(ids, targets=targets)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(ids, targets=targets)
    assert half.dtype == torch.float32  # the loss is accumulated in fp32 even under autocast
    assert abs(float(half) - float(full)) < 1e-2 * float(full)


def test_fused_adamw_on_cuda_equals_the_foreach_implementation():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny-llama", vocab_size=500)
    models = [Transformer(cfg).to(CUDA) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    tc = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(models[0], tc, "cuda")
    assert fused.defaults["fused"]
    reference = torch.optim.AdamW(param_groups(models[1], tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                  foreach=True)
    ids = torch.randint(0, 500, (2, 64), device=CUDA)
    for _ in range(3):
        for model, opt in zip(models, (fused, reference)):
            F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_bf16_pretraining_on_cuda(tmp_path):
    from test_train import config_dict, train_losses, write_dataset

    dataset = write_dataset(tmp_path / "ds")
    cfg = config_dict(dataset, tmp_path / "run", device="cuda", compile=True, dtype="auto", max_steps=20,
                      checkpoint_interval=0, eval_interval=10, warmup_steps=2)
    run_dir = pretrain(build_config(PretrainConfig, cfg))
    losses = train_losses(run_dir)
    assert losses[max(losses)] < losses[min(losses)] - 0.5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert math.isfinite(summary["val_loss"]) and summary["mfu"] > 0


def test_greedy_generation_on_cuda_matches_cpu(no_tf32):
    from lmforge.infer.generate import GenerationConfig, generate

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny-llama", vocab_size=1000)).eval()
    prompts = torch.randint(0, 1000, (3, 12))
    cfg = GenerationConfig(max_new_tokens=20, temperature=0.0, eos=False)
    on_cpu = [c.token_ids for c in generate(model, prompts, cfg)]
    on_gpu = [c.token_ids for c in generate(model.to(CUDA), prompts.to(CUDA), cfg)]
    assert on_gpu == on_cpu

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer
from lmforge.objectives import causal_lm_loss
from lmforge.objectives.cross_entropy import linear_cross_entropy


def test_linear_cross_entropy_worked_example():
    # h = [1, 0] and W = [[0, 0], [ln 3, 0]] give logits [0, ln 3]; target 1: p = 3/4, loss = -ln(3/4)
    hidden = torch.tensor([[1.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.tensor([1]))
    assert loss.item() == pytest.approx(-math.log(0.75), abs=1e-7)
    loss.backward()
    # dloss/dz = softmax - onehot = [1/4, -1/4]; dloss/dW = outer(dz, h); dloss/dh = dz @ W
    assert torch.allclose(weight.grad, torch.tensor([[0.25, 0.0], [-0.25, 0.0]]))
    assert torch.allclose(hidden.grad, torch.tensor([[-0.25 * math.log(3.0), 0.0]]))


@pytest.mark.parametrize("input_major", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_linear_cross_entropy_equals_cross_entropy_of_logits(input_major, chunk_rows):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    weight = torch.randn(11, 8)
    if input_major:  # the layout Transformer keeps its Linear weights in
        weight = weight.t().contiguous().t()
    targets = torch.randint(0, 11, (2, 5))
    targets[1, 3:] = -100
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = F.cross_entropy((h1 @ w1.t()).flatten(0, 1), targets.flatten(), ignore_index=-100)
    expected.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h2, w2, targets, chunk_rows=chunk_rows)
    (2.0 * loss).backward()  # the incoming gradient scales the stored ones
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(h2.grad, 2.0 * h1.grad, atol=1e-6)
    assert torch.allclose(w2.grad, 2.0 * w1.grad, atol=1e-6)
    assert w2.grad.stride() == w2.stride()
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows), expected,
                              atol=1e-6)


def test_linear_cross_entropy_under_bfloat16_autocast_is_close():
    torch.manual_seed(0)
    hidden, weight = torch.randn(16, 32), torch.randn(50, 32) / 4
    targets = torch.randint(0, 50, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy((hidden @ weight.t()).float(), targets)
        loss = linear_cross_entropy(hidden, weight.requires_grad_(), targets)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, expected, atol=2e-2)
    loss.backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()


def test_linear_cross_entropy_with_every_target_ignored_is_zero():
    hidden = torch.randn(3, 4, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(5, 4), torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(hidden.grad, torch.zeros(3, 4))


def test_causal_lm_loss_equals_cross_entropy_of_the_model_logits():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=37, block_size=16, n_layer=1, n_head=2, d_model=16))
    batch = {"input_ids": torch.randint(0, 37, (2, 6)), "targets": torch.randint(0, 37, (2, 6))}
    batch["targets"][0, :2] = -100
    loss, metrics = causal_lm_loss(model, batch)
    expected = F.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["targets"].flatten())
    assert torch.allclose(loss, expected, atol=1e-6)
    assert metrics == {"loss": pytest.approx(expected.item(), abs=1e-6), "tokens": 10.0}

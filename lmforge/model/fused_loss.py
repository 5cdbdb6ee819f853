"""Cross-entropy of an LM head without the (N, V) logits: the head matmul and the loss, fused and chunked.

    loss = 1/n * sum_{i : y_i != -100} (logsumexp(z_i) - z_i[y_i]),   z_i = W h_i,   n = #{i : y_i != -100}

The gradient is known in closed form, dloss/dz_i = (softmax(z_i) - onehot(y_i)) / n (0 for ignored rows), so the
forward pass computes it chunk by chunk, right after each chunk's logits, and keeps only

    dloss/dh = G W  (N, d)        dloss/dW = G^T H  (V, d)

Nothing of size N x V outlives a chunk: the logits, their float32 copy, log_softmax's output and its gradient (four
N x V tensors in the plain path) become one chunk of rows at a time, small enough to stay in cache, and
backward only scales the stored gradients by the incoming one. The matmuls run in the autocast dtype when autocast
is on (like the LM head it replaces); the softmax and the loss are float32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

IGNORE_INDEX = -100
CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**27}  # logits per chunk: 8 MiB of float32 on the CPU (stays in cache),
# 512 MiB on a GPU (keeps its matmuls large); other devices take the CPU's figure
MAX_CHUNKS = 32  # torch.compile unrolls the chunk loop: a bound on the number of chunks bounds the graph


def _matmul_dtype(t: Tensor) -> torch.dtype:
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def _chunk_rows(rows: int, vocab_size: int, device: torch.device, chunk_rows: Optional[int]) -> int:
    if chunk_rows:
        return chunk_rows
    elements = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"])
    return max(1, elements // vocab_size, -(-rows // MAX_CHUNKS))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:
        dtype = _matmul_dtype(hidden)
        h, w = hidden.to(dtype), weight.to(dtype)
        count = (targets != IGNORE_INDEX).sum()
        scale = 1.0 / count.clamp(min=1).to(torch.float32)
        grad_hidden = torch.empty_like(hidden)
        # dW accumulated in W's own memory order (an input-major head stores W^T contiguously), so autograd need
        # not copy it into the parameter's layout
        input_major = weight.stride(0) == 1 and weight.stride(1) != 1
        grad_w: Optional[Tensor] = None
        compiling = torch.compiler.is_compiling()  # Inductor turns an in-place addmm_ into addmm + a full copy
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                y = targets[rows]
                valid = y != IGNORE_INDEX
                safe_y = y.masked_fill(~valid, 0)[:, None]  # (n, 1)
                logits = (h[rows] @ w.t()).float()  # (n, V)
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
                loss += ((lse - logits.gather(1, safe_y)).squeeze(1) * valid).sum()
                probs = logits.sub_(lse).exp_()  # softmax, in place of the logits
                probs.scatter_add_(1, safe_y, torch.full_like(lse, -1.0))
                probs.mul_((valid * scale)[:, None])  # dloss/dz for these rows
                grad = probs.to(dtype)
                grad_hidden[rows] = (grad @ w).to(hidden.dtype)
                a, b = (h[rows].t(), grad) if input_major else (grad.t(), h[rows])  # dW^T (d, V) or dW (V, d)
                if grad_w is None:  # the first chunk's product starts the sum (float32 for low-precision ones)
                    grad_w = (a @ b).float()
                elif dtype != torch.float32:  # accumulate the low-precision products in float32
                    grad_w = grad_w + a @ b if compiling else grad_w.add_(a @ b)
                else:
                    grad_w = torch.addmm(grad_w, a, b) if compiling else grad_w.addmm_(a, b)
        if grad_w is None:  # no rows
            grad_w = torch.zeros(weight.shape[::-1] if input_major else weight.shape, dtype=torch.float32,
                                 device=weight.device)
        grad_w = (grad_w.t() if input_major else grad_w).to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_w)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_w = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_w * grad_loss, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                         chunk_rows: Optional[int] = None) -> Tensor:
    """Mean cross-entropy of logits hidden @ weight^T against targets, without materializing the logits.

    hidden (..., d), weight (V, d), targets (...) with IGNORE_INDEX for rows left out. Equals
    F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), targets.flatten(), ignore_index=-100) and its
    gradients. Without gradients to compute (validation), only the loss is computed, chunk by chunk.
    """
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = _chunk_rows(h.shape[0], weight.shape[0], h.device, chunk_rows)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, y, rows)
    with torch.no_grad():
        dtype = _matmul_dtype(h)
        h, w = h.to(dtype), weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], rows):
            logits = (h[start:start + rows] @ w.t()).float()
            total += torch.nn.functional.cross_entropy(logits, y[start:start + rows], ignore_index=IGNORE_INDEX,
                                                       reduction="sum")
        return total / (y != IGNORE_INDEX).sum().clamp(min=1)


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """log p(targets) under the logits hidden @ weight^T, per position: a tensor shaped like targets, 0 where the
    target is IGNORE_INDEX. Only the kept positions' logits are computed (responses of preference pairs and
    rollouts are a small part of their rows), in float32, with gradients."""
    keep = targets != IGNORE_INDEX
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    if not bool(keep.any()):
        return out + 0.0 * hidden.sum()  # keeps the graph (DDP expects every parameter to get a gradient)
    chosen = hidden[keep]
    logits = (chosen.to(_matmul_dtype(chosen)) @ weight.to(_matmul_dtype(chosen)).t()).float()
    picked = logits.log_softmax(dim=-1).gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    return out.masked_scatter(keep, picked)

"""Internal covariate shift per layer, Santurkar et al. (2018), Definition 2.1.

For layer i with weight W_i, on one batch (x, y) at training step t:

    G_i  = grad_{W_i} L(W_1^t, ..., W_k^t; x, y)
    G'_i = grad_{W_i} L(W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t; x, y)

ICS_i is ||G_i - G'_i||_2, reported with cos(G_i, G'_i): how much a layer's gradient changes because the
layers before it moved. Our choices, where the definition leaves room:

* "Layer" = a module with a ``weight`` matrix (Conv, Linear, Embedding), in registration order, which in our
  backbones is the forward order. A weight tensor shared by several modules (the LM's output layer tied to its
  token embedding) is one parameter and counts once, under the first module that registers it (the embedding,
  which owns it): a second entry would be the same tensor at the same position in the update order, so its
  ICS would repeat the owner's (0 for the embedding, the first layer) and bias the layer-mean ICS. "The earlier layers took their update" = every parameter registered before
  W_i (earlier weights, and the biases and norm gains/shifts between them) is at its value after the step;
  W_i and everything after it at its value before.
* The update W^{t+1} - W^t is the one the actual optimizer made at step t (SGD with momentum or AdamW, with
  weight decay, gradient clipping and the scheduled LR), read off the parameters after the step, not a
  plain gradient step.
* Norm layers run as in training (batch statistics; the same noise draw as the training step for noisy BN).

The first layer has no earlier layers, so its ICS is 0 and its cosine 1 by construction (computed, not
assumed). Hand-written for the same reason as ``landscape.py``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .landscape import LossFn, _set

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(module name, weight) of every Conv/Linear/Embedding with a trainable weight, in registration order; a
    tied weight once, under the first module that registers it (see the module doc)."""
    out, seen = [], set()
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, WEIGHT_LAYERS) and isinstance(w, nn.Parameter) and w.requires_grad and id(w) not in seen:
            seen.add(id(w))
            out.append((name, w))
    return out


def ics(loss_fn: LossFn, params: Sequence[torch.Tensor], layers: Sequence[int], before: Sequence[torch.Tensor],
        after: Sequence[torch.Tensor], grad: Sequence[torch.Tensor]) -> list[dict[str, float]]:
    """ICS of each layer whose weight is ``params[i]`` for i in ``layers``.

    ``params``: every parameter, in registration order; ``before``/``after``: their values before and after the
    optimizer step; ``grad``: grad L at ``before`` (G for every parameter). The parameters are put back to their
    values on entry. Returns one ``{"l2": ||G - G'||, "cos": cos(G, G'), "g_norm": ||G||}`` per layer.
    """
    entry = [p.detach().clone() for p in params]
    out = []
    try:
        for i in layers:
            _set(params, [*after[:i], *before[i:]])
            with torch.enable_grad():
                (g_prime,) = torch.autograd.grad(loss_fn(), [params[i]], allow_unused=True)
            g = grad[i].detach().double()
            gp = torch.zeros_like(g) if g_prime is None else g_prime.detach().double()
            den = float(g.norm() * gp.norm())
            out.append({"l2": float((g - gp).norm()), "cos": float((g * gp).sum()) / den if den > 0 else float("nan"),
                        "g_norm": float(g.norm())})
    finally:
        _set(params, entry)
    return out

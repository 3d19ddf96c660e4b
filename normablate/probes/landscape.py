"""Loss-landscape probes along the gradient (Santurkar et al. 2018, Sec. 3.1, Fig. 4).

At parameters x with gradient g = grad L(x) on a batch, for each step size eta of a grid:

* loss variation: L(x - eta g); reported as its min, max and range (max - min) over the grid;
* gradient predictiveness: ||grad L(x) - grad L(x - eta g)||_2, reported as its max over the grid;
* effective beta-smoothness: max over the grid of ||grad L(x) - grad L(x - eta g)|| / ||eta g||.

Norms are over the whole parameter vector (every parameter that has a gradient). Hand-written: no library
measures these quantities; it is a few in-place parameter moves and ``torch.autograd.grad`` calls.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LossFn = Callable[[], torch.Tensor]  # evaluates the loss at the parameters' current values


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


@torch.no_grad()
def _set(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def loss_and_grad(loss_fn: LossFn, params: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """L and grad L at the parameters' current values (``.grad`` is not touched)."""
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return float(loss.detach()), [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def landscape(loss_fn: LossFn, params: Sequence[torch.Tensor], grad: Sequence[torch.Tensor],
              step_sizes: Sequence[float]) -> dict[str, float]:
    """The three landscape measures at x = ``params`` along ``grad`` (= grad L(x)) over ``step_sizes``.

    ``params`` are moved in place to x - eta g for each eta and put back to x (bit-exact) before returning.
    Returns ``loss_min``, ``loss_max``, ``loss_range``, ``grad_pred`` (max l2 gradient change) and ``beta``
    (max gradient change per unit distance), plus ``loss@eta`` / ``grad_change@eta`` per step size.
    """
    x = [p.detach().clone() for p in params]
    g = [t.detach() for t in grad]
    g_norm = _norm(g)
    out: dict[str, float] = {}
    losses, changes, ratios = [], [], []
    try:
        for eta in step_sizes:
            _set(params, [xi - eta * gi for xi, gi in zip(x, g)])
            loss, g_eta = loss_and_grad(loss_fn, params)
            change = _norm([a - b for a, b in zip(g, g_eta)])
            losses.append(loss)
            changes.append(change)
            ratios.append(change / (abs(eta) * g_norm) if eta and g_norm > 0 else float("nan"))
            out[f"loss@{eta:g}"], out[f"grad_change@{eta:g}"] = loss, change
    finally:
        _set(params, x)
    finite_ratios = [r for r in ratios if r == r]
    out.update(loss_min=min(losses), loss_max=max(losses), loss_range=max(losses) - min(losses),
               grad_pred=max(changes), beta=max(finite_ratios) if finite_ratios else float("nan"),
               grad_norm=g_norm)
    return out

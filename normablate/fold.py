"""Fold eval-mode BatchNorm into the preceding convolution, as users deploy a BN network for inference.

In eval mode BN is a fixed per-channel affine map, ``y = (x - mu) / sqrt(var + eps) * g + b``; after a conv
``x = W * z + c`` it folds into the conv's weights, ``W' = W * s``, ``c' = (c - mu) * s + b`` with
``s = g / sqrt(var + eps)`` (PyTorch's ``torch.nn.utils.fusion.fuse_conv_bn_eval`` does the arithmetic). The
network then runs no normalization at all at inference: the claim "BN is faster than LN at inference" rests on
this (``normablate bench``, inference section).

A pair is folded only where the conv's output feeds the BN and nothing else, and only for BNs whose eval forward
is exactly that affine map: ``nn.BatchNorm2d`` and our ``bn`` (not noisy, masked or renormalizing variants,
which override ``forward``). The graph is found with ``torch.fx``, norms traced as leaf modules; ``torch.fx``'s
own ``fuse`` does the same but matches ``nn.BatchNorm2d`` by exact type only, so it misses our ``bn``.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from . import norms
from .norms.batch import BatchNorm


def _plain_bn(m: nn.Module) -> bool:
    return type(m) in (nn.BatchNorm2d, BatchNorm) and m.track_running_stats and m.running_mean is not None


class _NormLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return norms.is_norm(m) or super().is_leaf_module(m, qualname)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with every Conv2d -> BN pair folded into the conv; returns it and the count.

    The copy is a ``torch.fx.GraphModule`` (or ``model``'s copy unchanged when nothing folds or it cannot be
    traced); its eval outputs equal the original's up to float rounding (tested)."""
    model = copy.deepcopy(model).eval()
    try:
        graph = _NormLeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - a model fx cannot trace simply stays unfolded
        return model, 0
    gm = fx.GraphModule(model, graph)
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _plain_bn(modules[node.target]) or len(node.args) != 1:
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                and isinstance(modules[prev.target], nn.Conv2d)):
            continue
        conv, bn = modules[prev.target], modules[node.target]
        fused = fuse_conv_bn_eval(conv, bn)
        parent, _, name = prev.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fused)
        modules[prev.target] = fused
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    if not folded:
        return model, 0
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, folded


__all__ = ["fold_batchnorm"]

"""Fold eval-mode BatchNorm into an adjacent convolution or linear layer, as users deploy a BN network for inference.

In eval mode BN is a fixed per-channel affine map, ``y = x * s + t`` with ``s = g / sqrt(var + eps)`` and
``t = b - mu * s``. Three folds remove it exactly (float rounding aside):

* **Conv2d -> BN** (the BN normalizes the conv's output channels): ``W' = W * s`` (per output channel),
  ``c' = (c - mu) * s + b``; PyTorch's ``torch.nn.utils.fusion.fuse_conv_bn_eval`` does the arithmetic.
* **Linear -> BN** (BN over the Linear's output features, e.g. the ViT's BN-in-FFN, ``fc1 -> BN -> GELU``):
  the same per output feature, ``W' = diag(s) W``, ``c' = (c - mu) * s + b``.
* **BN -> Linear** (the BN's output feeds one Linear and nothing else, e.g. a pre-norm Transformer's
  ``norm1 -> qkv`` and ``norm2 -> fc1``, or ``after_act`` BN-in-FFN ``GELU -> BN -> fc2``):
  ``Linear(x * s + t) = (W diag(s)) x + (W t + c)``. (BN -> Conv is not folded: a padded conv would see the BN's
  shift at its zero padding, so that fold is not exact.)

Yao et al. (2021)'s ~20% is the *inference* speed of a BN ViT, whose BNs fold like this, against LN's, which
cannot fold (its statistics are per token): ``normablate bench --only vit_inference``.

A BN is folded only where the graph says it is safe: the producing conv/Linear feeds the BN and nothing else (or
the BN feeds one Linear, with only shape queries besides), each module is called once, and the BN's channel is
the Linear's feature dim (dropout and identity modules in between are skipped: identities in eval; our ``bn`` in
the tokens layout: always the last dim; an image-layout BN or
``nn.BatchNorm1d``: only on 2-D input, which needs ``example_inputs`` to be known). Only BNs whose eval forward
is exactly that affine map fold: ``nn.BatchNorm1d/2d`` and our ``bn`` (ghost BN included: its eval is BN's), not
noisy, masked or renormalizing variants, which override ``forward``. Every BN-family layer left unfolded is
reported with the reason (``fold_norms``). The graph is found with ``torch.fx``, norms traced as leaf modules;
``torch.fx``'s own ``fuse`` matches ``nn.BatchNorm2d`` by exact type only (it misses our ``bn``) and has no
Linear paths; hand-written for that.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from . import norms
from .norms.batch import BatchNorm


IDENTITY_IN_EVAL = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _plain_bn(m: nn.Module) -> bool:
    return (type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, BatchNorm) and m.track_running_stats
            and m.running_mean is not None)


class _NormLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return norms.is_norm(m) or super().is_leaf_module(m, qualname)


@dataclass
class FoldReport:
    """What ``fold_norms`` did: ``folded`` = (BN name, module it went into, path), path one of ``conv<-bn``,
    ``linear<-bn`` (BN after the Linear), ``bn->linear`` (BN before it); ``left`` = (name, reason) of every
    BN-family layer (``nn.BatchNorm*`` and subclasses: bn, masked_bn, noisy_bn, batch_renorm) left in place."""

    folded: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    traced: bool = True  # False: torch.fx could not trace the model; nothing folded

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm(s)"]
        lines += [f"  {bn} into {into} ({path})" for bn, into, path in self.folded]
        if self.left:
            lines.append(f"left {len(self.left)}:")
            lines += [f"  {bn}: {why}" for bn, why in self.left]
        return "\n".join(lines)


def _affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of the eval-mode BN: y = x * s + t per channel, in float64 (cast back by the callers)."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    s = torch.rsqrt(var + bn.eps)
    w = bn.weight.double() if bn.weight is not None else torch.ones_like(s)
    b = bn.bias.double() if bn.bias is not None else torch.zeros_like(s)
    return s * w, b - mean * s * w


def _new_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    out = nn.Linear(lin.in_features, lin.out_features, bias=True, device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out.train(lin.training)


def fuse_linear_bn(lin: nn.Linear, bn: nn.Module) -> nn.Linear:
    """``bn(lin(x))`` as one Linear (BN over the Linear's output features)."""
    s, t = _affine(bn)
    c = lin.bias.double() if lin.bias is not None else torch.zeros_like(s)
    return _new_linear(lin, lin.weight.double() * s[:, None], c * s + t)


def fuse_bn_linear(bn: nn.Module, lin: nn.Linear) -> nn.Linear:
    """``lin(bn(x))`` as one Linear (BN over the Linear's input features)."""
    s, t = _affine(bn)
    w = lin.weight.double()
    c = lin.bias.double() if lin.bias is not None else torch.zeros(lin.out_features, dtype=torch.float64,
                                                                     device=w.device)
    return _new_linear(lin, w * s[None, :], w @ t + c)


def _is_shape_query(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1:
        return n.args[1] in ("shape", "dtype", "device", "ndim")
    return n.op == "call_method" and n.target in ("size", "dim")


def _channel_last(node: fx.Node, bn: nn.Module) -> bool | None:
    """Whether the BN normalizes the last dim of its input: True/False, None when unknown (no shapes)."""
    if isinstance(bn, BatchNorm) and bn.layout == "tokens":
        return True
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    return len(meta.shape) == 2


def fold_norms(model: nn.Module, example_inputs: tuple | None = None) -> tuple[nn.Module, FoldReport]:
    """An eval-mode copy of ``model`` with every foldable BN folded (module doc), and the report of what folded and
    what did not, with why. ``example_inputs``: the model's positional inputs, to learn tensor shapes (needed
    only for image-layout BNs or ``nn.BatchNorm1d`` next to a Linear). The copy is a ``torch.fx.GraphModule``
    (``model``'s eval copy unchanged when nothing folds or fx cannot trace it); its eval outputs equal the
    original's up to float rounding (tested)."""
    model = copy.deepcopy(model).eval()
    report = FoldReport()
    bn_family = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        graph = _NormLeafTracer().trace(model)
    except Exception as e:  # noqa: BLE001 - a model fx cannot trace simply stays unfolded
        report.traced = False
        report.left = [(n, f"model not traceable by torch.fx ({type(e).__name__})") for n in bn_family]
        return model, report
    gm = fx.GraphModule(model, graph)
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):  # eval mode: dropout and identity modules pass their input through
        if node.op == "call_module" and isinstance(modules.get(node.target), IDENTITY_IN_EVAL) \
                and len(node.args) == 1 and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    why: dict[str, str] = {}

    def replace(target: str, new: nn.Module) -> None:
        parent, _, name = target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, new)
        modules[target] = new

    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        bn = modules[node.target]
        if not _plain_bn(bn):
            why[node.target] = (f"{type(bn).__name__} is not a plain BatchNorm with running statistics (its eval "
                                f"forward is not one affine map)")
            continue
        if len(node.args) != 1 or node.kwargs or calls[node.target] != 1:
            why[node.target] = "called with extra arguments (a mask) or more than once"
            continue
        prev = node.args[0]
        prev_mod = modules.get(prev.target) if isinstance(prev, fx.Node) and prev.op == "call_module" else None
        single = prev_mod is not None and len(prev.users) == 1 and calls[prev.target] == 1
        # 1. the BN follows a conv or a Linear that feeds it alone
        if single and isinstance(prev_mod, nn.Conv2d) and type(bn) is not nn.BatchNorm1d and \
                getattr(bn, "layout", "image") == "image":
            replace(prev.target, fuse_conv_bn_eval(prev_mod, bn))
            path, into = "conv<-bn", prev.target
        elif single and isinstance(prev_mod, nn.Linear) and _channel_last(node, bn):
            replace(prev.target, fuse_linear_bn(prev_mod, bn))
            path, into = "linear<-bn", prev.target
        else:
            # 2. the BN feeds one Linear and nothing else (shape queries aside: the BN keeps the shape)
            users = [u for u in node.users if not _is_shape_query(u)]
            nxt = users[0] if len(users) == 1 else None
            nxt_mod = modules.get(nxt.target) if nxt is not None and nxt.op == "call_module" else None
            if not (isinstance(nxt_mod, nn.Linear) and calls[nxt.target] == 1 and nxt.args == (node,)
                    and not nxt.kwargs and _channel_last(node, bn)):
                if _channel_last(node, bn) is None and (isinstance(prev_mod, nn.Linear)
                                                        or isinstance(nxt_mod, nn.Linear)):
                    why[node.target] = ("next to a Linear but its channel dim is unknown: pass example_inputs "
                                        "(it folds only on 2-D input)")
                else:
                    why[node.target] = ("neither directly after a Conv2d/Linear that feeds only it, nor feeding "
                                        "only one Linear")
                continue
            replace(nxt.target, fuse_bn_linear(bn, nxt_mod))
            path, into = "bn->linear", nxt.target
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        report.folded.append((node.target, into, path))
    report.left = [(n, why.get(n, "not reached in the traced forward")) for n in bn_family
                   if n not in {f for f, _, _ in report.folded}]
    if not report.folded:
        return model, report
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, report


def fold_batchnorm(model: nn.Module, example_inputs: tuple | None = None) -> tuple[nn.Module, int]:
    """``fold_norms`` returning the folded copy and the number of BNs folded."""
    folded, report = fold_norms(model, example_inputs)
    return folded, len(report.folded)


__all__ = ["FoldReport", "fold_batchnorm", "fold_norms", "fuse_bn_linear", "fuse_linear_bn"]

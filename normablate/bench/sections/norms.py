"""Section ``norms``: every registered norm (the registry is iterated, so new norms appear by themselves) in both
layouts, forward + backward, against its reference: the PyTorch layer computing the same math in its fastest exact
formulation (``nn.BatchNorm1d`` on ``(N*T, C)`` for tokens BN, ``nn.LayerNorm`` on a channels-last tensor for
per-pixel LN, ...); RMSNorm also against ``ln`` (the claim "RMSNorm is faster than LN"). With ``--compile``, both
also under ``torch.compile``."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ... import norms
from ..harness import fwd_bwd, inputs
from ..settings import Settings
from ..timing import Row, compare
from . import register

TEXT = ("Forward + backward per call, median of interleaved repeats; ratio = ours / reference (median of "
        "per-repeat ratios; > 1 = ours slower).")


def sizes(s: Settings) -> str:
    return (f"image x {s.image}, tokens x {s.tokens} ({s.pad_fraction:.0%} padding on average for masked norms), "
            f"{s.repeats} interleaved repeats" + (", norms " + " ".join(s.norms) if s.norms else "")
            + ("; eager and torch.compile" if s.compile else ""))


def _reference(name: str, layout: str, c: int) -> tuple[str, Callable]:
    """The PyTorch formulation a norm is compared with: (label, fn(x, mask)). Norms without an entry in
    ``_REFS`` (the BN family, new norms) are compared with PyTorch's BatchNorm in its fastest layout."""
    if name in _REFS:
        return _REFS[name](layout, c)
    if layout == "image":
        ref = nn.BatchNorm2d(c)
        return "nn.BatchNorm2d", lambda x, m: ref(x)
    ref1 = nn.BatchNorm1d(c)
    return "nn.BatchNorm1d on all (N*T, C) tokens", lambda x, m: ref1(x.reshape(-1, c)).view(x.shape)


def _ln_ref(layout: str, c: int):
    ref = nn.LayerNorm(c)
    if layout == "image":  # per pixel over C: nn.LayerNorm on a channels-last tensor (no copy)
        return ("nn.LayerNorm on channels-last x",
                lambda x, m: ref(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    return "nn.LayerNorm", lambda x, m: ref(x)


def _gn_ref(layout: str, c: int):
    ref = nn.GroupNorm(norms.group.default_groups(c), c)
    if layout == "image":
        return "nn.GroupNorm", lambda x, m: ref(x)
    return "nn.GroupNorm on (N*T, C)", lambda x, m: ref(x.reshape(-1, c)).view(x.shape)


def _rms_ref(layout: str, c: int):
    ref = nn.RMSNorm(c, eps=1e-6)
    if layout == "image":
        return ("nn.RMSNorm (F.rms_norm) on channels-last x",
                lambda x, m: ref(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    return "nn.RMSNorm (F.rms_norm)", lambda x, m: ref(x)


def _dyt_ref(layout: str, c: int):
    return _ln_ref(layout, c)  # DyT replaces LN: LN is its yardstick


_REFS: dict[str, Callable] = {"ln": _ln_ref, "gn": _gn_ref, "rms": _rms_ref, "dyt": _dyt_ref,
                              "none": lambda layout, c: ("nothing (x returned)", lambda x, m: x * 1.0)}


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _compiled_rows(name: str, layout: str, label: str, ours: Callable, ref: Callable, x: torch.Tensor,
                   mask: torch.Tensor | None, s: Settings) -> list[Row]:
    """Under ``torch.compile`` (forward and backward, static shapes): ours vs the reference both compiled, ours
    compiled vs ours eager (what compiling buys), and for RMSNorm the claim against LN, compiled and eager."""
    rows = []
    t0 = time.perf_counter()
    # The closures of every norm share code objects: without a reset, dynamo's recompile limit (8 per code object)
    # is reached after a few norms and later "compiled" calls silently run eager.
    torch._dynamo.reset()
    try:
        ours_c = _compiled(ours)
        ref_c = _compiled(ref)
        rows.append(compare("norms", name, layout, f"{name} compiled", f"{label} compiled",
                             fwd_bwd(ours_c, x, mask), fwd_bwd(ref_c, x, mask), s.repeats, variant="compiled"))
        rows.append(compare("norms", name, layout, f"{name} compiled", f"{name} eager", fwd_bwd(ours_c, x, mask),
                             fwd_bwd(ours, x, mask), s.repeats, variant="compiled",
                             note="what torch.compile buys this norm"))
        if name == "rms":
            c = x.shape[1] if layout == "image" else x.shape[-1]
            ln = norms.create("ln", c, layout=layout)

            def ln_fn(xx, m, ln=ln):
                return ln(xx)

            ln_c = _compiled(ln_fn)
            rows.append(compare("norms", name, layout, "rms compiled", "ln (ours) compiled",
                                 fwd_bwd(ours_c, x, mask), fwd_bwd(ln_c, x, mask), s.repeats, variant="compiled",
                                 note="claim: RMSNorm faster than LN, both compiled"))
            rows.append(compare("norms", name, layout, "rms compiled", "ln (ours) eager", fwd_bwd(ours_c, x, mask),
                                 fwd_bwd(ln_fn, x, mask), s.repeats, variant="compiled",
                                 note="claim: compiled RMSNorm vs the fused eager LayerNorm kernel"))
    except Exception as e:  # noqa: BLE001 - a norm torch.compile cannot handle is reported, not fatal
        rows.append(Row("norms", name, layout, "compiled", note=f"torch.compile failed: {type(e).__name__}: "
                                                                  f"{str(e).splitlines()[0][:150] if str(e) else ''}"))
    if rows:
        rows[0].note = (rows[0].note + "; " if rows[0].note else "") + \
            f"compiling and timing this norm's compiled rows took {time.perf_counter() - t0:.0f} s"
    return rows


@register("norms", text=TEXT, sizes=sizes)
def run(s: Settings) -> list[Row]:
    rows = []
    for name in s.norms or norms.available():
        for layout in norms.LAYOUTS:
            try:
                c = s.image[1] if layout == "image" else s.tokens[2]
                ours_mod = norms.create(name, c, layout=layout)
            except Exception as e:  # noqa: BLE001 - a norm that does not support a layout is reported, not fatal
                rows.append(Row("norms", name, layout, note=f"not built: {e}"))
                continue
            label, ref = _reference(name, layout, c)
            x, mask = inputs(layout, s, channels_last=False)
            takes_mask = mask is not None

            def ours(xx, m, mod=ours_mod, takes_mask=takes_mask):
                return mod(xx, mask=m) if takes_mask else mod(xx)

            note = f"{mask.float().mean():.0%} real tokens" if takes_mask else ""
            rows.append(compare("norms", name, layout, name, label, fwd_bwd(ours, x, mask),
                                 fwd_bwd(ref, x, mask), s.repeats, note=note))
            if name == "rms":  # the claim: RMSNorm faster than LN
                ln = norms.create("ln", c, layout=layout)
                rows.append(compare("norms", name, layout, "rms", "ln (ours)", fwd_bwd(ours, x, mask),
                                     fwd_bwd(lambda xx, m, ln=ln: ln(xx), x, mask), s.repeats,
                                     note="claim: RMSNorm faster than LN"))
            if layout == "image" and name in ("ln", "rms"):
                xcl, _ = inputs(layout, s, channels_last=True)
                rows.append(compare("norms", name, layout, f"{name} on channels-last x", label,
                                     fwd_bwd(ours, xcl, None), fwd_bwd(ref, xcl, None), s.repeats,
                                     variant="channels_last"))
            if s.compile:
                rows += _compiled_rows(name, layout, label, ours, ref, x, mask, s)
    return rows


"""``batch_size``: the study metric against the batch size per norm, with an LR scaling rule and a budget."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..dotted import get_dotted, set_dotted
from ..errors import ConfigError
from . import register
from .base import Comparison, Section, SpecContext, StudyKind

RULES = ("none", "linear", "sqrt")


def _get(d: dict, key: str) -> Any:
    """``key`` from a raw trial config, else the run config's default for it."""
    from ..config import RunConfig, to_dict

    value = get_dotted(d, key)
    return value if value is not None else get_dotted(to_dict(RunConfig()), key)


def budget_text(budget: dict[str, int]) -> str:
    (what, n), = budget.items()
    return f"same {what} per run ({n:,})"


@register("batch_size")
class BatchSize(StudyKind):
    keys = ("lr_scaling", "base_batch_size", "budget")
    per_sample_curves = True
    definition = """\
* ``batch_size``: m(batch size) per norm, with the LR rule (none: same LR; linear: lr * B / B0;
  sqrt: lr * sqrt(B / B0)) and the budget (same samples: steps = samples / B, validation and warmup rescaled to
  the same samples; same epochs: ``trainer.max_epochs``, resolved to steps at each batch size, rescaled alike;
  or same steps) applied in each trial's config; ``spread`` = largest minus smallest m over the batch sizes."""

    def check(self, raw: dict[str, Any], ctx: SpecContext) -> dict[str, Any]:
        ctx.need_axis(self.name, "data.batch_size", "data.batch_size: [8, 32, 128]")
        rule = ctx.choice("lr_scaling", raw.get("lr_scaling", "none"), RULES)
        base_bs = raw.get("base_batch_size", ctx.value("data.batch_size", 128))
        if not isinstance(base_bs, int) or isinstance(base_bs, bool) or base_bs < 1:
            raise ConfigError(f"{ctx.where}: base_batch_size={base_bs!r} must be an integer >= 1")
        budget = raw.get("budget")
        if budget is None and ctx.value("trainer.max_epochs") is not None:  # a base budget in epochs: same samples
            budget = {"epochs": ctx.value("trainer.max_epochs")}
        if budget is None:
            budget = {"samples": int(ctx.value("trainer.max_steps", 500)) * base_bs}
        if not (isinstance(budget, dict) and len(budget) == 1 and next(iter(budget)) in ("samples", "steps", "epochs")
                and isinstance(next(iter(budget.values())), int) and next(iter(budget.values())) >= 1):
            raise ConfigError(f"{ctx.where}: budget must be {{samples: N}}, {{steps: N}} or {{epochs: N}} with N >= 1, "
                              f"got {budget!r}")
        return {"lr_scaling": rule, "base_batch_size": base_bs, "budget": dict(budget)}

    def shape(self, d: dict[str, Any], options: dict[str, Any]) -> None:
        base_bs = int(options["base_batch_size"])
        bs = int(_get(d, "data.batch_size"))
        ratio = bs / base_bs
        scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[options["lr_scaling"]]
        set_dotted(d, "optim.lr", float(_get(d, "optim.lr")) * scale)
        budget = options["budget"]
        if "samples" in budget or "epochs" in budget:
            # validate and warm up after the same number of samples at every batch size
            for key in ("trainer.val_every", "optim.warmup_steps"):  # config defaults included
                v = int(_get(d, key))
                if v:
                    set_dotted(d, key, max(1, round(v * base_bs / bs)))
        if "epochs" in budget:  # same samples: train() resolves max_epochs to steps at this batch size
            set_dotted(d, "trainer.max_steps", None)
            set_dotted(d, "trainer.max_epochs", int(budget["epochs"]))
            return
        steps = max(1, math.ceil(int(budget["samples"]) / bs)) if "samples" in budget else int(budget["steps"])
        set_dotted(d, "trainer.max_steps", steps)
        if (d.get("trainer") or {}).get("max_epochs") is not None:  # the study's budget replaces one in epochs
            set_dotted(d, "trainer.max_epochs", None)

    # ------------------------------------------------------------------ report
    def table(self, data):
        import pandas as pd

        from ..analysis.data import groups
        from ..analysis.tables import cell

        metric = data.report_col  # test split where recorded (nothing is selected here)
        cols = [c for c in data.group_cols if c != "batch_size"]
        out = []
        for key, sub in groups(data.trials, cols):
            row: dict[str, Any] = dict(zip(cols, key))
            means = []
            for bs, s in sorted(sub.groupby("batch_size"), key=lambda kv: int(kv[0])):
                m, _, _, _, text = cell(s, metric)
                row[f"bs={int(bs)}"] = text + f" (lr {s['lr_used'].iloc[0]:.3g})"
                if math.isfinite(m):
                    means.append(m)
            row["spread"] = max(means) - min(means) if means else None
            out.append(row)
        return pd.DataFrame(out)

    def comparison(self, data, summ) -> Comparison:
        """The claim is about small batches: compare the norms at the smallest batch size."""
        from ..analysis.data import ok_rows
        from ..analysis.tables import config_label

        df, spec = data.trials, data.spec
        what = data.report_col.replace("_", " ", 1).replace("_", "/", 1)
        if not len(df):
            return Comparison(what, {}, spec.direction)
        smallest = min(int(b) for b in df["batch_size"])
        sub = df[df["batch_size"].astype(int) == smallest]
        cols = [c for c in data.group_cols if c != "batch_size"]
        values: dict[str, list] = {}
        for key, s in sub.groupby(cols, sort=False, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            ok = ok_rows(s)
            values[config_label(key, cols)] = ok[data.report_col].tolist() if data.report_col in ok else []
        return Comparison(f"{what} at the smallest batch size ({smallest})", values, spec.direction)

    def section(self, data, summ, out: Path) -> Section:
        from ..analysis.tables import conclusion, markdown_table

        o = data.spec.options
        bs = self.table(data)
        comp = self.comparison(data, summ)
        rep = data.report_col.replace("_", " ", 1).replace("_", "/", 1)
        md = (f"## Batch size ({rep}; LR rule {o['lr_scaling']}, base batch "
              f"{o['base_batch_size']}, {budget_text(o['budget'])})\n\n" + markdown_table(bs) + "\n"
              + conclusion(comp.values, comp.direction, comp.what) + "\n")
        return Section(md, [("Batch size", self.plot(data, out))], {"batch_size.csv": bs} if len(bs) else {})

    def plot(self, data, out: Path) -> Path | None:
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        from ..analysis import plots as P
        from ..analysis.data import mask_for, ok_rows
        from ..analysis.stats import mean_ci
        from ..analysis.tables import config_label

        df, spec = data.trials, data.spec
        metric = data.metric_col
        if not len(df) or metric not in df:
            return None
        fig, ax = plt.subplots(figsize=(7.2, 4.6))
        cols = [c for c in data.group_cols if c != "batch_size"]
        keys = list(dict.fromkeys(tuple(r[c] for c in cols) for _, r in df.iterrows()))
        look = P.styles([config_label(k, cols) for k in keys])
        cmap = {n: st["color"] for n, st in look.items()}
        series = []
        for i, k in enumerate(keys):
            name = config_label(k, cols)
            sub = df[mask_for(df, cols, k)]
            xs, ys, es, dx = [], [], [], []
            for b, s in sorted(sub.groupby("batch_size"), key=lambda kv: int(kv[0])):
                m, ci, n = mean_ci(ok_rows(s)[metric].tolist())
                if s["diverged"].astype(bool).any():
                    dx.append(int(b))
                if n:
                    xs.append(int(b) * P.dodge(i, len(keys)))
                    ys.append(m)
                    es.append(ci if math.isfinite(ci) else 0)
            series.append((name, xs, ys, es, dx))
        allm = [y for s in series for y in s[2]]
        span = (max(allm) - min(allm)) if allm else 1.0
        span = span or 0.1
        lo, hi = P.bounds_for(spec.metric, min((y - min(e, span / 2) for s in series for y, e in zip(s[2], s[3])),
                                               default=0.0),
                              max((y + min(e, span / 2) for s in series for y, e in zip(s[2], s[3])), default=1.0))
        ch = P.chance(data, spec.metric)
        if ch is not None and lo - 0.05 * (hi - lo) <= ch <= hi + 0.05 * (hi - lo):
            lo, hi = min(lo, ch - 0.02 * (hi - lo)), max(hi, ch)
        for name, xs, ys, es, dx in series:
            P.errorbars(ax, xs, ys, es, cmap[name], name, bounds=(lo, hi), marker=look[name]["marker"], lw=1.6,
                        ls=look[name]["ls"])
            if dx:
                ax.plot(dx, [lo + 0.03 * (hi - lo)] * len(dx), "x", color=cmap[name], ms=10, mew=2.5)
        P.chance_line(ax, ch if ch is not None and lo <= ch <= hi else None)
        ax.set_xscale("log", base=2)
        ax.set_ylim(lo, hi)
        bss = sorted(set(int(b) for b in df["batch_size"]))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(bss)
        ax.set_xticklabels([str(b) for b in bss])
        ax.set_xlabel("batch size (samples per step, log scale)")
        ax.set_ylabel(P.metric_label(spec.metric, spec.metric_at))
        o = spec.options
        P.suptitle(fig, P.figure_title(data, "metric vs batch size", f"LR rule: {o.get('lr_scaling')} (base batch "
                                       f"{o.get('base_batch_size')}); budget: "
                                       f"{budget_text(o.get('budget') or {'steps': 0})}; mean ± 95% CI over seeds"))
        ax.grid(alpha=0.3)
        ax.legend(title="norm", fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        return P.save(fig, out / "batch_size.png")

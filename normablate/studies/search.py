"""``search``: per group (each grid point, e.g. each norm) its own Optuna study searching a hyperparameter space.

Each group gets its own sampler (TPE by default), pruner and ``n_trials`` trials, so every norm is tuned with
the same budget; the report gives each group's best trial and its hyperparameters.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError, did_you_mean
from . import register
from .base import Comparison, Section, SpecContext, StudyKind, decode, encode

SAMPLERS = ("tpe", "random")


def make_sampler(s: dict[str, Any]):
    import optuna

    kw = {k: v for k, v in s.items() if k != "name"}
    if s["name"] == "tpe":
        return optuna.samplers.TPESampler(**kw)
    return optuna.samplers.RandomSampler(**kw)


def _check_dist(key: str, s: Any, where: str) -> dict[str, Any]:
    if not isinstance(s, dict):
        raise ConfigError(f"{where}: search_space.{key} must be a mapping ({{low, high, log}} or {{choices}})")
    if "choices" in s:
        if set(s) != {"choices"} or not isinstance(s["choices"], list) or not s["choices"]:
            raise ConfigError(f"{where}: search_space.{key}: a categorical takes only a non-empty 'choices' list")
        return {"choices": list(s["choices"])}
    allowed = {"low", "high", "log", "type", "step"}
    for k in s:
        if k not in allowed:
            valid = sorted(allowed | {"choices"})
            raise ConfigError(f"unknown key {k!r} in {where} search_space.{key}; valid: {', '.join(valid)}"
                              + did_you_mean(k, valid))
    if "low" not in s or "high" not in s:
        raise ConfigError(f"{where}: search_space.{key} needs low and high")
    typ = s.get("type", "int" if isinstance(s["low"], int) and isinstance(s["high"], int) and not s.get("log")
                else "float")
    if typ not in ("float", "int"):
        raise ConfigError(f"{where}: search_space.{key}.type={typ!r}; valid: float, int")
    try:
        low, high = (float(s["low"]), float(s["high"])) if typ == "float" else (int(s["low"]), int(s["high"]))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: search_space.{key}: low/high must be numbers") from None
    if not low < high or (s.get("log") and low <= 0):
        raise ConfigError(f"{where}: search_space.{key}: need low < high" + (" and low > 0 (log)" if s.get("log")
                                                                               else ""))
    out = {"type": typ, "low": low, "high": high, "log": bool(s.get("log", False))}
    if s.get("step") is not None:
        out["step"] = s["step"]
    return out


@register("search")
class Search(StudyKind):
    keys = ("search_space", "n_trials", "sampler")
    grouped = True
    line_key = "group"
    seeds_are_replicates = False  # a group's trials are different hyperparameters, not repeats
    definition = "* ``search``: per group (e.g. per norm), the trial with the best objective and its hyperparameters."

    def check(self, raw: dict[str, Any], ctx: SpecContext) -> dict[str, Any]:
        space = raw.get("search_space")
        if not isinstance(space, dict) or not space:
            raise ConfigError(f"{ctx.where}: kind search needs search_space: {{optim.lr: {{low: 1.0e-3, high: 1.0, "
                              f"log: true}}, ...}}")
        clean = {}
        for key, s in space.items():
            if key in ctx.axis_keys:
                raise ConfigError(f"{ctx.where}: {key!r} is both a grid axis and in search_space")
            clean[key] = _check_dist(key, s, ctx.where)
        n = raw.get("n_trials")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{ctx.where}: kind search needs n_trials (trials per group, >= 1), got {n!r}")
        sampler = raw.get("sampler") or {"name": "tpe"}
        if isinstance(sampler, str):
            sampler = {"name": sampler}
        if not isinstance(sampler, dict) or sampler.get("name") not in SAMPLERS:
            raise ConfigError(f"{ctx.where}: sampler {sampler!r} is not known; valid: {', '.join(SAMPLERS)}")
        sampler = dict(sampler)
        sampler.setdefault("seed", 0)
        if sampler["name"] == "tpe":
            sampler.setdefault("constant_liar", True)  # parallel workers do not all try the same point
        try:
            make_sampler(sampler)
        except TypeError as e:
            raise ConfigError(f"{ctx.where}: sampler {sampler}: {e}") from None
        return {"search_space": clean, "n_trials": n, "sampler": sampler}

    def trials_per_point(self, options: dict[str, Any]) -> int:
        return int(options["n_trials"])

    def validation_params(self, options: dict[str, Any]) -> list[dict[str, Any] | None]:
        """Corners of the search space (all lows, all highs, each categorical choice)."""
        space = options.get("search_space") or {}
        lows = {k: (s["choices"][0] if "choices" in s else s["low"]) for k, s in space.items()}
        highs = {k: (s["choices"][-1] if "choices" in s else s["high"]) for k, s in space.items()}
        out = [lows, highs]
        for k, s in space.items():
            for c in s.get("choices", []):
                out.append({**lows, k: c})
        return out

    def sampler(self, options: dict[str, Any]):
        return make_sampler(options["sampler"])

    def suggest(self, trial, options: dict[str, Any]) -> dict[str, Any]:
        params = {}
        for key, s in options["search_space"].items():
            if "choices" in s:
                params[key] = decode(trial.suggest_categorical(key, [encode(c) for c in s["choices"]]))
            elif s["type"] == "int":
                params[key] = trial.suggest_int(key, int(s["low"]), int(s["high"]), log=s["log"],
                                                step=int(s.get("step") or 1))
            else:
                params[key] = trial.suggest_float(key, s["low"], s["high"], log=s["log"], step=s.get("step"))
        return params

    # ------------------------------------------------------------------ report
    def group_cols(self, axis_names: list[str]) -> list[str] | None:
        return ["group"]  # each group is its own search

    def table(self, data):
        import pandas as pd

        from ..analysis.data import groups, ok_rows
        from ..analysis.tables import better

        df, spec = data.trials, data.spec
        is_better = better(spec.direction)
        out = []
        for (g,), sub in groups(df, ["group"]):
            best = None
            for _, r in ok_rows(sub).iterrows():
                v = r["value"]
                if v is not None and math.isfinite(v) and (best is None or is_better(v, best["value"])):
                    best = r
            row: dict[str, Any] = {"group": g, "n": len(sub), "n_diverged": int(sub["diverged"].astype(bool).sum()),
                                   "n_pruned": int((sub["state"] == "pruned").sum())}
            row["best_value"] = best["value"] if best is not None else None  # the objective: validation
            if data.reports_test:  # the chosen trial's test-split number (never used to choose)
                rep = best.get(data.report_col) if best is not None else None
                row["best_" + data.report_col] = rep if rep is not None and math.isfinite(rep) else None
            row["best_trial"] = int(best["trial"]) if best is not None else None
            for c in [c for c in df.columns if c.startswith("param_")]:
                row[c[len("param_"):]] = best[c] if best is not None else None
            row["run_dir"] = best["run_dir"] if best is not None else None
            out.append(row)
        return pd.DataFrame(out)

    def comparison(self, data, summ) -> Comparison:
        """Each group's best trial (one value each: a search's trials are different hyperparameters, not seeds,
        so there is no CI of the best; the headline says so)."""
        sb = self.table(data)
        c = "best_" + data.report_col if data.reports_test else "best_value"
        values = {r["group"]: ([r[c]] if r[c] is not None and r[c] == r[c] else []) for _, r in sb.iterrows()}
        what = data.report_col.replace("_", " ", 1).replace("_", "/", 1)
        return Comparison(f"{what} of its best trial (chosen on {data.spec.metric_at} {data.spec.metric})", values,
                          data.spec.direction)

    def section(self, data, summ, out: Path) -> Section:
        from ..analysis.tables import markdown_table

        spec = data.spec
        sb = self.table(data)
        md = (f"## Best hyperparameters per group (chosen on {spec.metric_at} {spec.metric}, {spec.direction}"
              + (f"; best_{data.report_col}: the chosen trial on the test split" if data.reports_test else "")
              + ")\n\n"
              + markdown_table(sb) + "\n**Conclusion:** each group's best trial is one run of one hyperparameter "
              "setting, so these values carry no CI; re-run the best settings over seeds (a grid study) to test "
              "whether the groups differ.\n")
        return Section(md, [("Search progress", self.plot(data, out))], {"search_best.csv": sb} if len(sb) else {})

    def plot(self, data, out: Path) -> Path | None:
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        from ..analysis import plots as P

        df, spec = data.trials, data.spec
        if not len(df):
            return None
        fig, ax = plt.subplots(figsize=(7.2, 4.4))
        groups = list(dict.fromkeys(df["group"]))
        look = P.styles(groups)
        cmap = {g: st["color"] for g, st in look.items()}
        sign = 1 if spec.direction == "maximize" else -1
        for g in groups:
            sub = df[(df["group"] == g) & (df["state"] == "complete")].sort_values("trial")
            vals = [v if v is not None and math.isfinite(v) else math.nan for v in sub["value"]]
            best, run = [], -math.inf
            for v in vals:
                if math.isfinite(v):
                    run = max(run, sign * v)
                best.append(sign * run if math.isfinite(run) else math.nan)
            ax.plot(sub["trial"], vals, "o", color=cmap[g], alpha=0.4, ms=4)
            ax.step(sub["trial"], best, where="post", color=cmap[g], lw=1.8, ls=look[g]["ls"],
                    label=f"{g} (best so far, {len(sub)} trials)")
        ch = P.chance(data, spec.metric)
        ys = [v for v in df["value"] if v is not None and math.isfinite(v)]
        if ch is not None and ys and min(ys) - (max(ys) - min(ys)) <= ch <= max(ys):  # near the data: worth a line
            P.chance_line(ax, ch)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("trial number (within the group's study)")
        ax.set_ylabel(P.metric_label(spec.metric, spec.metric_at))
        P.suptitle(fig, f"{P.headline(data)} — search progress per group\ndots: trials (diverged not shown), "
                        f"line: best so far; n per group in the legend (one seed per trial)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        return P.save(fig, out / "search_history.png")

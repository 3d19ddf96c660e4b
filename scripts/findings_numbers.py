"""The numbers in docs/findings.md that no single study report gives: comparisons across studies of the identical
setup (e.g. bn_position's BN after the ReLU against santurkar_vgg's runs without normalization, same seeds, same
data, same steps) and paired within-run comparisons (PreciseBN vs EMA statistics). Reads only the committed
report CSVs (docs/findings/<study>/trials.csv, probes_per_run.csv) and skips a study that is not there yet.

    python scripts/findings_numbers.py > docs/findings/cross_study.md

Statistics as in the reports: mean ± half-width of the 95% t-interval over seeds; differences by Welch's t-test
(independent runs) or, for two measurements of the same run, the t-interval of the per-run differences; each
variant at its best LR by the reports' rule. All of it is normablate.analysis (stats, verdicts): this script keeps
only the joins and the wording of each claim.
"""
from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pandas as pd

from normablate.analysis.stats import diff_of_diffs, fmt_ci, mean_ci, paired_ci, welch
from normablate.analysis.verdicts import best_lr_runs
from normablate.analysis.verdicts import best_lr as _best_lr

FINDINGS = Path(__file__).resolve().parents[1] / "docs" / "findings"


def load(study: str, name: str = "trials.csv", keep_diverged: bool = False) -> pd.DataFrame | None:
    """A study's finished runs, without the diverged ones unless ``keep_diverged`` (for best-LR choices: an LR
    where any seed diverged is not a candidate, as in the reports)."""
    path = FINDINGS / study / name
    if not path.exists():
        print(f"_({study}: {name} not there yet; run `bash scripts/reproduce_findings.sh {study}`)_\n")
        return None
    df = pd.read_csv(path)
    if "state" in df:
        df = df[df["state"] == "complete"]
        if not keep_diverged:
            df = df[~df["diverged"].astype(bool)]
    return df


def pick(df: pd.DataFrame, **where) -> pd.DataFrame:
    for k, v in where.items():
        col = df[k]
        df = df[(col - v).abs() < 1e-12] if isinstance(v, float) else df[col.astype(str) == str(v)]
    return df


def stat(values) -> str:
    m, ci, n = mean_ci(list(values))
    return f"{fmt_ci(m, ci)} (n={n})"


def diff(a, b, digits: int = 3) -> str:
    d = welch(list(a), list(b))
    if not math.isfinite(d.ci95):
        return f"{d.diff:+.{digits}g} (too few runs for a CI)"
    verdict = "clear" if d.clear else "CI covers 0"
    return f"{d.diff:+.{digits}g} [95% CI {d.lo:+.{digits}g}, {d.hi:+.{digits}g}], Welch p={d.p:.2g} ({verdict})"


def paired(a, b, digits: int = 3) -> str:
    """Mean of the per-run differences a - b with its 95% t-interval (a and b measured on the same runs)."""
    m, ci, n = paired_ci(a, b)
    if not math.isfinite(ci):
        return f"{m:+.{digits}g} (n={n}, too few runs for a CI)"
    verdict = "clear" if (m - ci > 0 or m + ci < 0) else "CI covers 0"
    return f"{m:+.{digits}g} [95% CI {m - ci:+.{digits}g}, {m + ci:+.{digits}g}] (paired, n={n}; {verdict})"


def claim3() -> None:
    print("## Claim 3: loss landscape, BN vs none (landscape_vgg, each run's mean over its probed steps)\n")
    runs = load("landscape_vgg", "probes_per_run.csv")
    if runs is None:
        return
    for lr in sorted(runs["lr"].unique()):
        print(f"lr = {lr}:\n")
        for col, what in (("probe/loss_range", "loss variation"), ("probe/grad_pred", "gradient predictiveness"),
                          ("probe/beta", "effective beta-smoothness"), ("ics_l2", "ICS l2"), ("ics_cos", "ICS cos")):
            bn, noisy, none = (pick(runs, norm=n, lr=lr)[col] for n in ("bn", "noisy_bn", "none"))
            print(f"- {what}: bn {stat(bn)}, noisy_bn {stat(noisy)}, none {stat(none)}; "
                  f"bn - none {diff(bn, none)}; noisy_bn - bn {diff(noisy, bn)}")
        print()


def claim4() -> None:
    print("## Claim 4: BN after the ReLU vs no normalization (bn_position vs santurkar_vgg, identical setup)\n")
    pos, sv = load("bn_position"), load("santurkar_vgg")
    if pos is None or sv is None:
        return
    for lr in (0.03, 0.1):
        after = pick(pos, norm_position="after_act", lr=lr)
        before = pick(pos, norm_position="before_act", lr=lr)
        none = pick(sv, norm="none", lr=lr)
        bn_sv = pick(sv, norm="bn", lr=lr)
        print(f"lr = {lr}: final val acc: after {stat(after['final_val_acc'])}, before {stat(before['final_val_acc'])}, "
              f"none {stat(none['final_val_acc'])}; after - none {diff(after['final_val_acc'], none['final_val_acc'])}; "
              f"after - before {diff(after['final_val_acc'], before['final_val_acc'])}\n")
        print(f"  train-loss AUC: after {stat(after['train_loss_auc'])}, before {stat(before['train_loss_auc'])}, "
              f"none {stat(none['train_loss_auc'])}; after - none {diff(after['train_loss_auc'], none['train_loss_auc'])}; "
              f"after - before {diff(after['train_loss_auc'], before['train_loss_auc'])}\n")
        same = sorted(before["final_val_acc"].round(6)) == sorted(bn_sv["final_val_acc"].round(6))
        print(f"  (bn_position's before-ReLU runs reproduce santurkar_vgg's BN runs exactly: {same})\n")


def claim10() -> None:
    print("## Claim 10: BN momentum, batch size, the train/eval gap and PreciseBN (bn_momentum)\n")
    df = load("bn_momentum")
    if df is None:
        return
    gap, gap_p = "final_val_train_eval_gap", "final_val_train_eval_gap_precise"
    for bs in sorted(df["batch_size"].unique()):
        runs = {m: pick(df, norm=f"bn(momentum={m})", batch_size=bs).sort_values("seed") for m in (0.01, 0.1, 0.5)}
        # the momentum only moves the running statistics: training (and so batch-statistics and PreciseBN
        # evaluation) is the same for every momentum of a seed
        same = all((runs[m]["final_val_acc_batchstats"].round(6).to_list()
                    == runs[0.1]["final_val_acc_batchstats"].round(6).to_list()) for m in runs)
        print(f"batch {bs} (training identical across momenta: {same}):\n")
        for m, r in runs.items():
            print(f"- momentum {m}: gap (EMA) {stat(r[gap])}, gap (PreciseBN) {stat(r[gap_p])}, "
                  f"val acc EMA {stat(r['final_val_acc'])}, PreciseBN {stat(r['final_val_acc_precise'])}, "
                  f"batch stats {stat(r['final_val_acc_batchstats'])}; EMA gap - PreciseBN gap "
                  f"{paired(r[gap], r[gap_p])}")
        for m in (0.01, 0.5):
            print(f"- gap, momentum {m} - 0.1: {paired(runs[m][gap], runs[0.1][gap])}")
        # the extreme contrast (added at the 6-seed write-up; the spec's comparisons are against the default 0.1)
        print(f"- gap, momentum 0.01 - 0.5: {paired(runs[0.01][gap], runs[0.5][gap])}")
        for m in runs:
            print(f"- val acc, batch stats - EMA, momentum {m}: "
                  f"{paired(runs[m]['final_val_acc_batchstats'], runs[m]['final_val_acc'])}; "
                  f"PreciseBN - EMA: {paired(runs[m]['final_val_acc_precise'], runs[m]['final_val_acc'])}")
        print()
    sizes = sorted(df["batch_size"].unique())
    if len(sizes) == 2:  # more, smaller steps for the same samples (the LR scaled with the batch)
        for m in (0.01, 0.1, 0.5):
            a, b = (pick(df, norm=f"bn(momentum={m})", batch_size=bs)[gap] for bs in (sizes[1], sizes[0]))
            print(f"- gap at momentum {m}, batch {sizes[1]} - batch {sizes[0]}: {diff(a, b)}")
        print()
    gap_figure(df)


def gap_figure(df: pd.DataFrame) -> None:
    """Train/eval gap against BN momentum, one line per batch size (mean ± 95% CI over seeds), and the
    PreciseBN gap of the same runs as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    moms = [0.01, 0.1, 0.5]
    for i, bs in enumerate(sorted(df["batch_size"].unique())):
        color = f"C{i}"
        ms, lo, hi = [], [], []
        for m in moms:
            mean, ci, _ = mean_ci(pick(df, norm=f"bn(momentum={m})", batch_size=bs)["final_val_train_eval_gap"].tolist())
            ms.append(mean), lo.append(ci), hi.append(ci)
        x = [m * (0.93 if i == 0 else 1.07) for m in moms]  # dodge the two batch sizes
        ax.errorbar(x, ms, yerr=[lo, hi], marker="o", capsize=3, color=color, label=f"batch {bs}: EMA running stats")
        p, pci, n = mean_ci(pick(df, norm="bn(momentum=0.1)", batch_size=bs)["final_val_train_eval_gap_precise"].tolist())
        ax.axhline(p, color=color, ls="--", lw=1, label=f"batch {bs}: PreciseBN (100 batches), {p:.3f} ± {pci:.3f}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks(moms, [str(m) for m in moms])
    ax.set_xlabel("BN momentum m (weight of the new batch; PyTorch default 0.1)")
    ax.set_ylabel("train/eval gap at the end (nats)\nval loss with running stats − with batch stats")
    ax.set_title(f"bn_momentum: train/eval gap (mean ± 95% CI over {df['seed'].nunique()} seeds)", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    save_figure(fig, "bn_momentum_gap.png")


def save_figure(fig, name: str) -> None:
    """Write a cross-study figure to docs/findings/cross/<name> and say so in the output."""
    import matplotlib.pyplot as plt

    out = FINDINGS / "cross" / name
    out.parent.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    print(f"Figure: `{out.relative_to(FINDINGS)}`\n")


def best_lr(df: pd.DataFrame, metric: str = "final_val_acc") -> float | None:
    """The LR with the highest mean over seeds of the runs in df (the reports' rule: analysis.verdicts.best_lr);
    None when no LR qualifies (each diverged or has no finite value)."""
    lr = _best_lr(df, metric, "maximize")
    return None if lr is None else float(lr)


def claim11() -> None:
    print("## Claim 11: BN with vs without affine (gamma, beta), before vs after the ReLU (bn_affine)\n")
    df = load("bn_affine")
    if df is None:
        return
    for pos in ("before_act", "after_act"):
        aff, noaff = pick(df, norm="bn", norm_position=pos), pick(df, norm="bn(affine=False)", norm_position=pos)
        la, ln_ = best_lr(aff), best_lr(noaff)
        if la is None or ln_ is None:
            print(f"- {pos}: no best LR for {'affine' if la is None else 'no affine'} (each LR diverged or has no "
                  "finite final val acc)")
        else:
            a, b = pick(aff, lr=la), pick(noaff, lr=ln_)
            print(f"- {pos}, each at its best LR (affine {la}, no affine {ln_}): final val acc affine "
                  f"{stat(a['final_val_acc'])}, no affine {stat(b['final_val_acc'])}; affine - no affine "
                  f"{diff(a['final_val_acc'], b['final_val_acc'])}; train-loss AUC affine "
                  f"{stat(a['train_loss_auc'])}, no affine {stat(b['train_loss_auc'])}; difference "
                  f"{diff(a['train_loss_auc'], b['train_loss_auc'])}")
        for lr in sorted(df["lr"].unique()):
            a, b = pick(aff, lr=lr), pick(noaff, lr=lr)
            print(f"  - lr {lr}: acc affine - no affine {diff(a['final_val_acc'], b['final_val_acc'])}")
    print()


def variant_best(df: pd.DataFrame, keys: list[str], metric: str, maximize: bool) -> dict[tuple, pd.DataFrame]:
    """For each variant (a value of every key column), its runs at its own best LR: the best mean over seeds among
    the LRs where no seed diverged (the reports' rule; load(keep_diverged=True) keeps the runs that say so)."""
    return best_lr_runs(df, keys, metric, "maximize" if maximize else "minimize")


def label(variant: tuple) -> str:
    return " + ".join(str(v) for v in variant if str(v) not in ("nan", "None", ""))


def compare_variants(df: pd.DataFrame, keys: list[str], metric: str, maximize: bool, baseline: tuple,
                     extra: tuple[str, ...] = ("train_loss_auc",)) -> None:
    """Each variant at its best LR against ``baseline`` at its best LR (Welch). Speed is not taken from the study
    runs (they shared the machine with other work: their wall times and throughputs are not comparable); it is
    the ``models`` section of ``normablate bench`` (docs/benchmarks.md), variants interleaved step by step."""
    best = variant_best(df, keys, metric, maximize)
    base = best.get(baseline)
    if base is None:
        print(f"_(baseline {baseline} not in the runs)_\n")
        return
    for variant, runs in best.items():
        line = f"- {label(variant)} (best lr {runs['lr'].iloc[0]:g}): {metric} {stat(runs[metric])}"
        if variant != baseline:
            line += f"; - {label(baseline)} {diff(runs[metric], base[metric])}"
        for col in extra:
            if col in runs and runs[col].notna().any():
                line += f"; {col} {stat(runs[col])}"
                if variant != baseline and col in base and base[col].notna().any():
                    line += f" ({diff(runs[col].dropna(), base[col].dropna())})"
        print(line)
    print()


def claims_6_8_12() -> None:
    print("## Claims 6, 8 (quality), 12: language modelling on padded samples (lm_norms)\n")
    # the LR checks are the same runs (same spec but optim.lr) at one more LR: each norm's best LR is taken over
    # lm_norms' grid and its check's LR together
    df = lm_without_scalar()
    if df is None:
        return
    print(f"LRs run per norm (lm_norms + its LR checks): {lrs_run(df)}\n")
    print("Each norm at its best LR (lowest mean final validation perplexity), against LN:\n")
    compare_variants(df, ["norm"], "final_val_ppl", maximize=False, baseline=("ln",),
                     extra=("final_val_loss", "train_loss_auc", "final_val_train_eval_gap"))
    best = variant_best(df, ["norm"], "final_val_ppl", maximize=False)
    if ("bn",) in best and ("masked_bn",) in best:
        print(f"- masked_bn - bn: {diff(best[('masked_bn',)]['final_val_ppl'], best[('bn',)]['final_val_ppl'])}")
        gap = best[("bn",)]["final_val_ppl"].mean() - best[("ln",)]["final_val_ppl"].mean()
        rec = best[("bn",)]["final_val_ppl"].mean() - best[("masked_bn",)]["final_val_ppl"].mean()
        if gap <= 0:
            print(f"- BN is not behind LN (mean ppl difference {gap:+.3g})\n")
        elif rec <= 0:
            print(f"- BN is behind LN by {gap:.3g} ppl (mean) and masked BN recovers none of it\n")
        else:
            print(f"- share of BN's perplexity gap to LN that masked BN recovers: {rec / gap:.2f} (gap {gap:.3g})\n")


def with_lr_checks(study: str, checks: tuple[str, ...] = ()) -> tuple[pd.DataFrame | None, list[str]]:
    """A study and those of its LR checks (the same runs, spec but optim.lr, at more LRs) that are there, as one
    table with the diverged runs kept (variant_best leaves out their LRs), and the names of those checks. None
    until the study itself is there."""
    runs = load(study, keep_diverged=True)
    if runs is None:
        return None, []
    found = {c: load(c, keep_diverged=True) for c in checks}
    found = {c: df for c, df in found.items() if df is not None}
    return pd.concat([runs, *found.values()], ignore_index=True), list(found)


def lrs_run(df: pd.DataFrame) -> str:
    """The LRs run for each norm, e.g. "ln: 0.001, 0.01; dyt: 0.0003, 0.001 (2/3 diverged)"."""
    def one(lr: float, g: pd.DataFrame) -> str:
        runs = g[g["lr"] == lr]
        nd = int(runs["diverged"].astype(bool).sum()) if "diverged" in runs else 0
        return f"{lr:g}" + (f" ({nd}/{len(runs)} diverged)" if nd else "")

    return "; ".join(f"{n}: " + ", ".join(one(x, g) for x in sorted(g["lr"].unique()))
                     for n, g in df.groupby("norm", sort=False))


def lm_without_scalar() -> pd.DataFrame | None:
    """lm_norms and its LR checks (the LM without an embedding scalar)."""
    return with_lr_checks("lm_norms", ("lm_lr_check", "lm_dyt_lr_check"))[0]


# the two DyT recipe checks: the embedding scalar's initial value in each (lm_norms has none), and their LR checks
LM_RECIPES = {"lm_dyt_recipe_check": ("sqrt_d (8)", ()), "lm_dyt_scale_check": ("45", ("lm_dyt_scale_lr_check",))}


def claim12_lm_recipe() -> None:
    print("## Claim 12 on the LM with the DyT authors' embedding scalar (lm_dyt_recipe_check, lm_dyt_scale_check)\n")
    plain = lm_without_scalar()
    without = variant_best(plain, ["norm"], "final_val_ppl", maximize=False) if plain is not None else {}
    best_per_study = {}
    for study, (scale, checks) in LM_RECIPES.items():
        if not (FINDINGS / study / "trials.csv").exists():
            load(study)  # says it is not there yet
            continue
        print(f"### {study}: embedding scalar initialised to {scale}\n")
        df, found = with_lr_checks(study, checks)  # a missing check is reported here, under its study's heading
        if found:
            print(f"With its LR check ({', '.join(found)}: the same runs at more LRs); LRs run per variant: "
                  f"{lrs_run(df)}\n")
        print("Each variant at its best LR, against LN with the same scalar:\n")
        compare_variants(df, ["norm"], "final_val_ppl", maximize=False, baseline=("ln",), extra=("final_val_loss",))
        scaled = best_per_study[study] = variant_best(df, ["norm"], "final_val_ppl", maximize=False)
        if not without:
            continue
        print("With the scalar minus without it (lm_norms + its LR checks), each at its best LR:\n")
        for variant, runs in scaled.items():
            base = without.get(("dyt",) if variant[0].startswith("dyt") else variant)
            if base is not None:
                print(f"- {label(variant)} (lr {runs['lr'].iloc[0]:g}) - {base['norm'].iloc[0]} without the scalar "
                      f"(lr {base['lr'].iloc[0]:g}): {diff(runs['final_val_ppl'], base['final_val_ppl'])}")
        dyts = {v: r for v, r in scaled.items() if v[0].startswith("dyt")}
        if dyts and ("ln",) in without:
            v, runs = min(dyts.items(), key=lambda kv: kv[1]["final_val_ppl"].mean())
            print(f"- best DyT with the scalar, {label(v)} (lr {runs['lr'].iloc[0]:g}), - LN without it "
                  f"(lr {without[('ln',)]['lr'].iloc[0]:g}): "
                  f"{diff(runs['final_val_ppl'], without[('ln',)]['final_val_ppl'])}")
        print()
    # the split's references: lm_dyt_scale_check's (+ its LR check's) variants at their best LRs
    alpha_split(best_per_study.get("lm_dyt_scale_check", {}), without)


def alpha_split(uniform: dict[tuple, pd.DataFrame], without: dict[tuple, pd.DataFrame]) -> None:
    """lm_dyt_alpha_split_check: DyT with alpha_0 set separately before attention (attn_norm) and elsewhere (norm),
    scalar 45; each split at its best LR against LN with the same scalar, the uniform DyT with the split's
    'elsewhere' alpha_0 (lm_dyt_scale_check + its LR check), and LN without a scalar."""
    df = load("lm_dyt_alpha_split_check", keep_diverged=True)
    if df is None:
        return
    print("### lm_dyt_alpha_split_check: DyT alpha_0 before attention (attn_norm) / elsewhere (norm), scalar 45\n")
    best = variant_best(df, ["attn_norm", "norm"], "final_val_ppl", maximize=False)
    refs = [("LN with the scalar", uniform.get(("ln",))), ("LN without it", without.get(("ln",)))]
    for (attn, other), runs in best.items():
        line = (f"- before attention {attn}, elsewhere {other} (best lr {runs['lr'].iloc[0]:g}): final_val_ppl "
                f"{stat(runs['final_val_ppl'])}")
        for name, ref in [*refs, (f"uniform {other}", uniform.get((other,)))]:
            if ref is not None:
                line += f"; - {name} (lr {ref['lr'].iloc[0]:g}) {diff(runs['final_val_ppl'], ref['final_val_ppl'])}"
        print(line)
    dyts = {v: r for v, r in uniform.items() if v[0].startswith("dyt")}
    if best and dyts:
        (a, o), runs = min(best.items(), key=lambda kv: kv[1]["final_val_ppl"].mean())
        u, ref = min(dyts.items(), key=lambda kv: kv[1]["final_val_ppl"].mean())
        print(f"- best split ({a} / {o}, lr {runs['lr'].iloc[0]:g}) - best uniform DyT ({label(u)}, "
              f"lr {ref['lr'].iloc[0]:g}): {diff(runs['final_val_ppl'], ref['final_val_ppl'])}")
    per_lr = df[~df["diverged"].astype(bool)].groupby(["attn_norm", "norm", "lr"], sort=False)["final_val_ppl"]
    print("\nPer LR: " + "; ".join(f"{a} / {o} at {lr:g}: {stat(v)}" for (a, o, lr), v in per_lr) + "\n")


def claims_7_12() -> None:
    print("## Claims 7, 12 on a ViT: block norm x BN in the FFN (vit_norms)\n")
    df = load("vit_norms")
    if df is None:
        return
    df = df.assign(ffn_norm=df["ffn_norm"].fillna("none") if "ffn_norm" in df else "none")
    print("Each variant (block norm, FFN norm) at its best LR, against LN without an FFN norm:\n")
    compare_variants(df, ["norm", "ffn_norm"], "final_val_acc", maximize=True, baseline=("ln", "none"),
                     extra=("train_loss_auc",))
    print("Speed: docs/benchmarks.md, section models (training-step time per variant vs LN, interleaved).\n")
    lr_check = load("vit_lr_check")
    if lr_check is not None:
        print("LR 0.01 (vit_lr_check: the same runs above vit_norms' grid top), against each norm's vit_norms best:\n")
        best = variant_best(df, ["norm", "ffn_norm"], "final_val_acc", maximize=True)
        raw = pd.read_csv(FINDINGS / "vit_lr_check" / "trials.csv")
        for norm, runs in lr_check.groupby("norm", sort=False):
            ref = best.get((norm, "none"))
            n_div = int(raw.loc[raw["norm"] == norm, "diverged"].astype(bool).sum())
            line = f"- {norm} at 0.01: final_val_acc {stat(runs['final_val_acc'])}" + (
                f" ({n_div} diverged, left out)" if n_div else "")
            if ref is not None:
                line += (f"; - {norm} at its vit_norms best ({ref['lr'].iloc[0]:g}) "
                         f"{diff(runs['final_val_acc'], ref['final_val_acc'])}")
            ln = best.get(("ln", "none"))
            if norm != "ln" and ln is not None:
                line += f"; - ln at its vit_norms best ({ln['lr'].iloc[0]:g}) {diff(runs['final_val_acc'], ln['final_val_acc'])}"
            print(line)
        print()


def drop_ci(hi: pd.Series, lo: pd.Series, hi2: pd.Series, lo2: pd.Series) -> str:
    """(hi - lo) - (hi2 - lo2) of four independent groups of runs, with a Welch-Satterthwaite 95% CI."""
    d = diff_of_diffs(hi, lo, hi2, lo2)
    if not math.isfinite(d.ci95):
        return "(too few runs for a CI)"
    verdict = "clear" if d.clear else "CI covers 0"
    return f"{d.diff:+.3g} [95% CI {d.lo:+.3g}, {d.hi:+.3g}], p={d.p:.2g} ({verdict})"


def claim5() -> None:
    print("## Claim 5: the batch size, BN vs GN / LN / RMS (batch_size_norms; sqrt rule: batch_size_sqrt_check)\n")
    df = load("batch_size_norms")
    if df is None:
        return
    bcol = "batch_size"
    print("Linear LR scaling (batch_size_norms):\n")
    batch_size_effects(df, bcol)
    tiny = load("batch_size_tiny_check")
    if tiny is not None:
        # the same runs below batch 8 (BN and GN only): joined with batch_size_norms' runs of those norms
        joined = pd.concat([tiny, df[df["norm"].isin(tiny["norm"].unique())]], ignore_index=True)
        print("Linear LR scaling down to batch 2 (batch_size_tiny_check joined with batch_size_norms):\n")
        batch_size_effects(joined, bcol)
        print("The same, from the largest batch to each smaller one:\n")
        drops_by_batch(joined, bcol)
        gn_lrs = load("batch_size_gn_lr_check", keep_diverged=True)
        if gn_lrs is not None:
            gn_lr_check(tiny, gn_lrs, bcol)
    sqrt_runs = load("batch_size_sqrt_check")
    if sqrt_runs is None:
        return
    # at the base batch (128) both rules give the same LR: batch_size_norms' runs there serve both rules
    base = df[bcol].max()
    sq = pd.concat([sqrt_runs, df[df[bcol] == base]], ignore_index=True)
    print(f"Square-root LR scaling (batch_size_sqrt_check; batch {base} from batch_size_norms):\n")
    batch_size_effects(sq, bcol)
    print("Square-root minus linear rule, same norm and batch size:\n")
    for norm in sqrt_runs["norm"].unique():
        cells = []
        for b in sorted(sqrt_runs[bcol].unique()):
            a, l_ = pick(sqrt_runs, norm=norm), pick(df, norm=norm)
            cells.append(f"batch {b}: {diff(a[a[bcol] == b]['final_val_acc'], l_[l_[bcol] == b]['final_val_acc'])}")
        print(f"- {norm}: " + "; ".join(cells))
    print()
    linear = df if tiny is None else pd.concat([tiny, df], ignore_index=True)
    batch_size_figure({"linear LR rule": linear, "square-root LR rule": sq}, bcol)


def batch_size_figure(rules: dict[str, pd.DataFrame], bcol: str, chance: float = 0.1) -> None:
    """Final accuracy against the batch size, one panel per norm, one line per LR scaling rule (mean ± 95% CI
    over seeds) with each run as a dot; the batch-128 runs are shared by both rules. A run that ended near chance
    (below 2x chance: it did not train) would squash the axis: the range is set by the other runs, such a run is
    drawn as a triangle on the lower edge, and a mean it drags below the range is written there."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from normablate.analysis.plots import bounds_for, errorbars

    norms = list(dict.fromkeys(n for df in rules.values() for n in df["norm"].unique()))
    runs = {(rule, n): {b: pick(df, norm=n)[lambda g: g[bcol] == b]["final_val_acc"].tolist()
                        for b in sorted(pick(df, norm=n)[bcol].unique())}
            for rule, df in rules.items() for n in norms}
    stats = {k: [(b, *mean_ci(v)) for b, v in pts.items()] for k, pts in runs.items()}
    trained = [v for pts in runs.values() for vals in pts.values() for v in vals if v >= 2 * chance]
    ends = trained + [v for k, pts in stats.items() for b, m, ci, _ in pts
                      if math.isfinite(ci) and min(runs[k][b]) >= 2 * chance for v in (m - ci, m + ci)]
    bounds = bounds_for("final_val_acc", min(ends), max(ends))
    fig, axes = plt.subplots(1, len(norms), figsize=(3.2 * len(norms), 3.5), sharey=True, squeeze=False)
    sizes = sorted({b for pts in stats.values() for b, *_ in pts})
    for ax, n in zip(axes[0], norms):
        for i, rule in enumerate(rules):
            pts = stats[(rule, n)]
            if not pts:
                continue
            dodge = 10 ** (0.025 * (i - 0.5))  # the rules' error bars side by side
            color = f"C{i}"
            errorbars(ax, [b * dodge for b, *_ in pts], [m for _, m, _, _ in pts], [ci for _, _, ci, _ in pts],
                      color, label=rule, bounds=bounds, marker="o", ls="-" if i == 0 else "--")
            for b, vals in runs[(rule, n)].items():
                ok = [v for v in vals if v >= bounds[0]]
                ax.plot([b * dodge * 1.04] * len(ok), ok, ".", color=color, alpha=0.45, ms=4)
                low = len(vals) - len(ok)
                if low:
                    m = sum(vals) / len(vals)
                    ax.plot(b * dodge, bounds[0], "v", color=color, ms=7, clip_on=False)
                    ax.annotate(f"{low} run{'s' if low > 1 else ''} at {min(vals):.2f}\n(mean {m:.2f})",
                                (b * dodge, bounds[0]), xytext=(6, 6), textcoords="offset points", fontsize=7.5,
                                color=color)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.set_ylim(*bounds)
        ax.set_title(n)
        ax.set_xlabel("batch size (same 128,000 samples)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final validation accuracy")
    axes[0][0].legend(fontsize=8, loc="best")
    n_seeds = max(int(df["seed"].nunique()) for df in rules.values())
    fig.suptitle(f"Claim 5: accuracy vs batch size per norm, mean ± 95% CI over {n_seeds} seeds, dots: runs "
                 f"(batch 128: the same runs, LR 0.03, for both rules)", fontsize=10)
    save_figure(fig, "batch_size_rules.png")


def gn_lr_check(tiny: pd.DataFrame, gn_lrs: pd.DataFrame, bcol: str) -> None:
    """GN at batch 2 with other LRs (batch_size_gn_lr_check) next to batch_size_tiny_check's batch-2 runs (base LR
    0.03 for both norms): GN's accuracy at each LR and minus BN's; GN's best LR (an LR where a seed diverged is
    not a candidate, as in the reports) minus BN."""
    b = int(gn_lrs[bcol].iloc[0])
    ref = tiny[tiny[bcol] == b]
    bn = pick(ref, norm="bn")
    runs = pd.concat([pick(ref, norm="gn"), pick(gn_lrs, norm="gn")], ignore_index=True)
    runs["diverged"] = runs["diverged"].astype(bool)
    print(f"GN at batch {b} with other LRs (batch_size_gn_lr_check), against batch_size_tiny_check's batch-{b} runs "
          f"(BN at LR {bn['lr_used'].iloc[0]:g}):\n")
    for lr, g in sorted(runs.groupby("lr_used"), key=lambda kv: kv[0]):
        n_div = int(g["diverged"].sum())
        ok = g[~g["diverged"]]
        print(f"- gn at LR {lr:g} (base {lr * 128 / b:g} at batch 128): final val acc {stat(ok['final_val_acc'])}"
              + (f", {n_div} diverged (left out)" if n_div else "")
              + f"; - bn {diff(ok['final_val_acc'], bn['final_val_acc'])}")
    best = _best_lr(runs, "final_val_acc", "maximize", lr="lr_used")
    if best is not None:
        print(f"- gn at its best LR of these ({best:g}) - bn at {bn['lr_used'].iloc[0]:g}: "
              + diff(runs[runs["lr_used"] == best]["final_val_acc"], bn["final_val_acc"]))
    print()


def at_batch(g: pd.DataFrame, b, col: str, bcol: str) -> pd.Series:
    """Column ``col`` of g's runs at batch size ``b``."""
    return g[g[bcol] == b][col]


def drops_by_batch(df: pd.DataFrame, bcol: str) -> None:
    """For each batch size below the largest: every norm's accuracy change from the largest batch to it, BN's
    change minus each other norm's (difference of differences), the training-loss AUC change and, at that batch,
    each norm's training-loss AUC minus BN's."""
    sizes = sorted(df[bcol].unique())
    large = sizes[-1]
    norms = list(df["norm"].unique())
    bn = pick(df, norm="bn")

    at = functools.partial(at_batch, bcol=bcol)

    for b in sizes[:-1]:
        cells = [f"{n} {diff(at(pick(df, norm=n), large, 'final_val_acc'), at(pick(df, norm=n), b, 'final_val_acc'))}"
                 for n in norms]
        print(f"- accuracy, batch {large} - batch {b}: " + "; ".join(cells))
        for n in norms:
            if n != "bn":
                g = pick(df, norm=n)
                print(f"  - BN's drop minus {n}'s: " + drop_ci(at(bn, large, "final_val_acc"), at(bn, b, "final_val_acc"),
                                                         at(g, large, "final_val_acc"), at(g, b, "final_val_acc")))
        if "train_loss_auc" in df and df["train_loss_auc"].notna().any():
            cells = [f"{n} {diff(at(pick(df, norm=n), b, 'train_loss_auc'), at(pick(df, norm=n), large, 'train_loss_auc'))}"
                     for n in norms]
            print(f"  - training-loss AUC, batch {b} - batch {large}: " + "; ".join(cells))
            g = df[df[bcol] == b]
            print(f"  - training-loss AUC at batch {b}: " + "; ".join(
                f"{n} - bn {diff(pick(g, norm=n)['train_loss_auc'], pick(g, norm='bn')['train_loss_auc'])}"
                for n in norms if n != "bn"))
    print()


def batch_size_effects(df: pd.DataFrame, bcol: str) -> None:
    """Per norm: accuracy at each batch size and the change from the largest to the smallest; BN's change
    against each other norm's (the claim: BN loses more at small batches); every norm against BN per batch;
    the same for the training-loss AUC; BN's batch- vs running-statistics accuracy."""
    sizes = sorted(df[bcol].unique())
    small, large = sizes[0], sizes[-1]
    norms = list(df["norm"].unique())
    bn = pick(df, norm="bn")

    at = functools.partial(at_batch, bcol=bcol)

    def bn_change_minus(g: pd.DataFrame, col: str) -> str:
        """(BN at the large batch - at the small one) - (the same for g's norm), with its Welch CI."""
        return drop_ci(at(bn, large, col), at(bn, small, col), at(g, large, col), at(g, small, col))

    for norm in norms:
        g = pick(df, norm=norm)
        cells = ", ".join(f"batch {b}: {stat(at(g, b, 'final_val_acc'))}" for b in sizes)
        print(f"- {norm}: final val acc {cells}; batch {large} - batch {small} "
              f"{diff(at(g, large, 'final_val_acc'), at(g, small, 'final_val_acc'))}")
    print()
    for norm in norms:
        if norm != "bn":
            g = pick(df, norm=norm)
            print(f"- BN's accuracy drop (batch {large} - batch {small}) minus {norm}'s: "
                  + bn_change_minus(g, "final_val_acc"))
    for b in sizes:
        g = df[df[bcol] == b]
        print(f"- batch {b}: " + "; ".join(f"{n} - bn {diff(pick(g, norm=n)['final_val_acc'], pick(g, norm='bn')['final_val_acc'])}"
                                           for n in norms if n != "bn"))
    if "train_loss_auc" in df and df["train_loss_auc"].notna().any():
        # training loss (train mode: BN normalizes with the batch's own statistics), mean over the run
        for norm in norms:
            g = pick(df, norm=norm)
            print(f"- {norm}: training-loss AUC " + ", ".join(f"batch {b}: {stat(at(g, b, 'train_loss_auc'))}"
                                                            for b in sizes)
                  + f"; batch {small} - batch {large} {diff(at(g, small, 'train_loss_auc'), at(g, large, 'train_loss_auc'))}")
        for norm in norms:
            if norm != "bn":
                g = pick(df, norm=norm)
                # (norm - bn) at the small batch minus at the large one: the same difference of differences
                print(f"- training-loss AUC, {norm} - bn at batch {small} minus at batch {large}: "
                      + bn_change_minus(g, "train_loss_auc"))
    if "final_val_acc_batchstats" in bn and bn["final_val_acc_batchstats"].notna().any():
        # BN evaluated with batch statistics (the validation batch's own) instead of its running averages
        print("- BN with batch statistics minus with running statistics (paired, same runs): " + "; ".join(
            f"batch {b}: {paired(list(g['final_val_acc_batchstats']), list(g['final_val_acc']))}"
            for b in sizes for g in [bn[bn[bcol] == b].dropna(subset=["final_val_acc_batchstats"])] if len(g)))
    print()


def main() -> None:
    print("# Cross-study numbers (generated by `python scripts/findings_numbers.py`; do not edit)\n")
    for claim in (claim3, claim4, claim10, claim11, claim5, claims_6_8_12, claim12_lm_recipe, claims_7_12):
        claim()
        sys.stdout.flush()


if __name__ == "__main__":
    main()

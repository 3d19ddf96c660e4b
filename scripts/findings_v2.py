"""The v2 findings table, computed from the committed journals: every verdict word comes from the tool.

    python scripts/findings_v2.py            # print the table (docs/findings/v2/table.md is its copy)
    python scripts/findings_v2.py --write    # also write table.md and replace the table in docs/findings.md

For every pre-registered v2 study (``configs/studies/v2/<study>.yaml`` at budget 1, ``<study>_3x.yaml`` at
budget 2) and its journal (``docs/findings/v2/<study>.journal``):

* a study whose journal is missing is *queued*; a study with fewer finished trials than its grid is *running*:
  its hypotheses are not evaluated at all (no verdict is read before a study completes: the table shows the count
  only, and this script computes nothing else from an unfinished study);
* a finished study's hypotheses are judged as ``normablate report`` judges them (``analysis.verdicts.evaluate``);
* the verdict words apply Holm across the document's whole family: every primary hypothesis at both budgets,
  the unfinished ones at p = 1 (``analysis.budgets.family``: an interim word can only get stronger later);
* where both budgets are finished, the change of the effect between them with its interval
  (``analysis.budgets.change``);
* a claim answered by two studies' rows together (``COMBINED``: claim 6 by shen_powernorm and 6w) gets its word
  at each budget from those rows' words, by the rule fixed before the second study ran (``combine``).

"untestable at this budget" is never computed: it is a reader's judgement, written in ``NOTES`` below with the
budget that could test the claim, and shown beside the computed word.

Running the studies (resumable, in the table's order; a long job for several sessions):

    python scripts/findings_v2.py --run                  # every unfinished budget-1 study, one after another
    python scripts/findings_v2.py --run --budget 2 --only shen_powernorm_wide_3x

Each runs as ``normablate sweep --config <spec> --workers N --storage journal:docs/findings/v2/<study>.journal``
from a clean git worktree beside this checkout (``--tree here``: from this checkout), so every trial records
``versions.git_dirty: False`` and the commit it ran; ``../shared`` resolves the same from there. The worktree is
made as each study starts: a new study runs HEAD as it is then, a resumed one the commit its trials ran,
so one study never mixes commits and code committed while a study runs is used from the next study on. Ctrl-C or
SIGTERM stops the running sweep cleanly (its trials keep their checkpoints) and nothing after it starts; SIGUSR1
lets the running study finish and starts nothing after it; the same command resumes. Commit the journals as they
land.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from normablate.analysis import budgets, verdicts  # noqa: E402
from normablate.report.data import load  # noqa: E402
from normablate.sweep.spec import load_spec  # noqa: E402

SPECS = ROOT / "configs" / "studies" / "v2"
JOURNALS = ROOT / "docs" / "findings" / "v2"
FINDINGS = ROOT / "docs" / "findings.md"
BEGIN, END = "<!-- v2-table:begin (scripts/findings_v2.py --write) -->", "<!-- v2-table:end -->"

# the running order (docs/findings.md: by how much the v1 reading doubted the claims), then the claim numbers
ORDER = ["santurkar_lr_range", "shen_powernorm", "shen_powernorm_wide", "yao_vit_bn", "wuhe_ghost_bn", "santurkar_noisy_bn",
         "ioffe_bn_placement", "lm_rms_dyt", "vit_dyt", "santurkar_landscape", "bn_momentum_gap"]
CLAIM = {"santurkar_lr0.5": "1b", "santurkar_lr0.1": "1b", "santurkar_best_lr": "1c",
         "shen_bn_trails_ln": "6", "shen_pn_beats_ln": "6", "shen_pn_beats_masked_bn": "6",
         "shen_wide_bn_trails_ln": "6w", "shen_wide_pn_beats_ln": "6w", "shen_wide_pn_beats_masked_bn": "6w",
         "yao_ffn_bn_matches_ln": "7", "yao_all_bn_worse": "7",
         "santurkar_noisy_bn_matches_bn": "2", "ioffe_before_beats_after": "4", "affine_helps_before": "11",
         "affine_helps_after": "11", "zhang_rms_matches_ln": "8q", "zhu_dyt_matches_ln_lm": "12",
         "zhu_dyt_matches_ln_vit": "12", "wuhe_gn_beats_bn_at_2": "5", "wuhe_drop_vs_gn_at_2": "5",
         "wuhe_drop_vs_gn_at_4": "5", "wuhe_gn_comparable_typical": "5", "santurkar_smoother_loss": "3",
         "santurkar_grad_predictive": "3", "santurkar_beta_smaller": "3", "santurkar_bn_no_less_ics": "3",
         "momentum_default_beats_small": "10", "momentum_large_beats_small": "10", "small_batch_wants_small_m": "10"}
# the source each claim number is tested against (the spec's header quotes it)
SOURCE = {"1b": "Santurkar et al. 2018", "1c": "Santurkar et al. 2018", "2": "Santurkar et al. 2018",
          "3": "Santurkar et al. 2018", "4": "Ioffe & Szegedy 2015", "11": "Ioffe & Szegedy 2015",
          "5": "Wu & He 2018", "6": "Shen et al. 2020", "6w": "Shen et al. 2020", "7": "Yao et al. 2021",
          "8q": "Zhang & Sennrich 2019", "12": "Zhu et al. 2025", "10": "practitioners; Wu & Johnson 2021"}
# the reader's notes (e.g. "untestable at this budget: ..."), by hypothesis id; written by hand, never computed
NOTES: dict[str, str] = {
    "santurkar_lr0.5": "budget 1: untestable in this set-up: both arms end at chance in every seed (test acc "
                       "0.1000; 1 of 3 no-norm runs stopped as diverged): with SGD momentum 0.9 at a constant LR 0.5 "
                       "BN did not train either, so the contrast carried no information about the claim. Budget 2 "
                       "(3x steps, same recipe), against what was expected here before it ran: BN trains at LR 0.5 "
                       "in 1 of 3 seeds (test acc 0.540; the other two at chance), no-norm in none (1 of 3 stopped "
                       "as diverged), so the contrast now carries information, but one seed in three makes its CI "
                       "+-0.43 wide. What would test it: a recipe in which BN trains at LR 0.5 reliably (the paper "
                       "names only the LRs), or many more seeds (the report: about 8.5x, if the estimate were the "
                       "truth). A recipe search at full width on a GPU costs about 0.5 GPU-hours (about 0.04 "
                       "GPU-hours per 40-epoch VGG-11 run by configs/studies/gpu/README.md's estimate, 2 arms x 3 "
                       "seeds x 2 candidate recipes)",
    "yao_ffn_bn_matches_ln": "budget 2: contradicted at the study's own Holm family of 2 because BN + FFN BN is "
                             "*better* than LN by more than the margin (90% CI +0.029 to +0.035 against +-0.02), "
                             "not worse; about a 4-block, width-64 ViT on CIFAR-10 only",
    "zhang_rms_matches_ln": "about this 0.1M-parameter LM only (the source: machine translation and larger models)",
    "zhu_dyt_matches_ln_lm": "about this 0.1M-parameter LM only; the source's LMs are 7B-70B LLaMAs with tuned "
                             "alpha_init: untestable at this machine's budget. At the source's smallest scale (7B "
                             "parameters, ~1e11 tokens: 6 x 7e9 x 1e11 = 4e21 FLOP) one run is thousands of "
                             "GPU-hours; the largest LM specified here (configs/studies/gpu/lm_wikitext103.yaml, "
                             "10.9M parameters, ~14 GPU-hours for 54 runs) is still 600x smaller",
    "zhu_dyt_matches_ln_vit": "about a tiny ViT on CIFAR-10 only (the source: ViT-B/L on ImageNet-1k)",
}

# claims answered by two studies' rows together, with the rule that combines them, each fixed in docs/findings.md
# before the second study's first run (6w: "How 6 and 6w combine", commit a6a610d, 2026-12-06 11:23 UTC; 6w's
# first trial started at 12:45): claim -> (rule's words,
# [(question, row of one study, row of the other)]). ``combine`` applies it; nothing here is judged by hand.
COMBINED: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "6": ("supported (or contradicted) only where both rows say so at a budget; otherwise inconclusive "
          "(docs/findings.md, committed in a6a610d before 6w's first run)",
          [("BN (masked) trails LN", "shen_bn_trails_ln", "shen_wide_bn_trails_ln"),
           ("PowerNorm beats LN", "shen_pn_beats_ln", "shen_wide_pn_beats_ln"),
           ("PowerNorm beats masked BN", "shen_pn_beats_masked_bn", "shen_wide_pn_beats_masked_bn")]),
}


def combine(rows: list[dict], combined: dict | None = None) -> tuple[str, list[dict]]:
    """The claims of ``COMBINED`` at each budget, from the table's rows (their document-level words): a question
    is *supported* (or *contradicted*) at a budget where both its rows are, *inconclusive* where both rows are
    finished otherwise, and *pending* while either is not finished. Returns a markdown table and its rows."""
    combined = COMBINED if combined is None else combined
    by_id = {r["id"]: r for r in rows}
    out, lines = [], []
    for claim, (rule, questions) in combined.items():
        for question, a, b in questions:
            row = {"claim": claim, "question": question, "rows": (a, b)}
            for k in (1, 2):
                ra, rb = by_id.get(a, {}), by_id.get(b, {})
                if ra.get(f"state_{k}") != "complete" or rb.get(f"state_{k}") != "complete":
                    row[f"verdict_{k}"] = "pending"
                    continue
                wa, wb = ra[f"verdict_{k}"], rb[f"verdict_{k}"]
                row[f"verdict_{k}"] = wa if wa == wb and wa in ("supported", "contradicted") else "inconclusive"
            out.append(row)
            lines.append(f"| {claim} | {question} | `{a}` + `{b}` | **{row['verdict_1']}** | **{row['verdict_2']}** |")
    if not out:
        return "", out
    rules = "; ".join(f"claim {c}: {r}" for c, (r, _) in combined.items())
    text = "\n".join([f"Claims answered by two studies' rows together, combined by a rule fixed in advance ({rules}):",
                      "", "| # | question | rows | budget 1 | budget 2 |", "|---|---|---|---|---|", *lines, ""])
    return text, out


@dataclass
class Study:
    name: str
    spec_path: Path
    journal: Path
    total: int
    hypotheses: list[dict]
    state: str = "queued"  # queued | running | complete
    done: int = 0
    judged: dict[str, verdicts.Verdict] = field(default_factory=dict)
    cpu_hours: float = math.nan
    commits: list[str] = field(default_factory=list)  # the commits its trials ran (trial_commits: newest last)


def read_study(spec_path: Path, journal_dir: Path) -> Study:
    spec = load_spec(spec_path)
    name = spec_path.stem
    st = Study(name, spec_path, journal_dir / f"{name}.journal", spec.total, list(spec.hypotheses))
    if not st.journal.exists():
        return st
    data = load(spec.study_name, f"journal:{st.journal}")
    st.done = len(data.trials)
    st.commits = trial_commits(spec.study_name, st.journal)
    if st.done < st.total:
        st.state = "running"  # nothing else is read from an unfinished study
        return st
    st.state = "complete"
    st.judged = {v.id: v for v in verdicts.evaluate(data)}
    if "cpu_time" in data.trials and data.trials["cpu_time"].notna().any():
        st.cpu_hours = float(data.trials["cpu_time"].dropna().sum()) / 3600.0
    return st


def trial_commits(study_name: str, journal: Path) -> list[str]:
    """The commits a study's trials ran, every trial counted (finished, interrupted, running or failed), ordered
    by each commit's last use (by trial start): the start-time ``git_commit`` attribute, else the finished run's
    ``versions.git_commit`` (trials from before the start-time record). "unknown" (not a git checkout) is left out."""
    import optuna

    from normablate.sweep.storage import normalize_url, open_storage

    st = open_storage(normalize_url(f"journal:{journal}"), create=False)
    out: list[tuple[float, str]] = []
    for name in optuna.get_all_study_names(st):
        if name != study_name and not name.startswith(study_name + "/"):
            continue  # (a grouped kind keeps its trials in one study per group: "<study>/<group>")
        for t in optuna.load_study(study_name=name, storage=st).get_trials(deepcopy=False):
            ua = t.user_attrs
            c = ua.get("git_commit") or (ua.get("versions") or {}).get("git_commit")
            if c and c != "unknown":
                out.append((t.datetime_start.timestamp() if t.datetime_start else math.inf, c))
    last = {c: i for i, (_, c) in enumerate(sorted(out, key=lambda x: x[0]))}  # each commit's last use
    return sorted(last, key=last.get)


def studies(spec_dir: Path, journal_dir: Path, order: list[str] | None = None) -> list[tuple[Study, Study | None]]:
    """(budget 1, budget 2) per study, in ``order`` (then by name)."""
    names = sorted(p.stem for p in spec_dir.glob("*.yaml") if not p.stem.endswith("_3x"))
    rank = {n: i for i, n in enumerate(order or [])}
    names.sort(key=lambda n: (rank.get(n, len(rank)), n))
    out = []
    for n in names:
        long = spec_dir / f"{n}_3x.yaml"
        out.append((read_study(spec_dir / f"{n}.yaml", journal_dir),
                    read_study(long, journal_dir) if long.exists() else None))
    return out


def _num(x: float) -> str:
    return f"{x:+.3g}" if math.isfinite(x) else "–"


def build(spec_dir: Path = SPECS, journal_dir: Path = JOURNALS, order: list[str] | None = ORDER,
          claims: dict[str, str] | None = None, notes: dict[str, str] | None = None,
          combined: dict | None = None) -> tuple[str, list[dict]]:
    """The markdown table and its rows (one per hypothesis; Holm across all hypotheses at both budgets)."""
    claims = CLAIM if claims is None else claims
    notes = NOTES if notes is None else notes
    pairs = studies(spec_dir, journal_dir, order)
    entries = []  # (study pair, hypothesis, budget index, Verdict or None)
    alphas = set()
    for short, long in pairs:
        for h in short.hypotheses:
            alphas.add(h["alpha"])
            for b, st in enumerate((short, long)):
                entries.append((short, long, h, b, st.judged.get(h["id"]) if st is not None else None))
    if len(alphas) > 1:
        raise SystemExit(f"the document's hypotheses use alpha {sorted(alphas)}: one Holm family needs one alpha")
    alpha = alphas.pop() if alphas else 0.05
    ws, adj, adjk = budgets.family([v.test if v is not None else None for *_, v in entries], alpha)
    judged = {(s.name, h["id"], b): (v, w, a, k) for (s, _, h, b, v), w, a, k in zip(entries, ws, adj, adjk)}
    m = len(entries)
    rows, lines = [], []
    head = ("| # | hypothesis | type | budget 1 (1x steps) | budget 2 (3x steps) | change, budget 2 − 1 | "
            "cost (CPU-h, 1x / 3x) | source | note |\n|---|---|---|---|---|---|---|---|---|")
    for short, long in pairs:
        for h in short.hypotheses:
            cells, auto, row = [], [], {"id": h["id"], "claim": claims.get(h["id"], ""), "study": short.name}
            for b, st in enumerate((short, long)):
                if st is None:
                    cells.append("no spec")
                    continue
                if st.state != "complete":
                    cells.append(st.state if st.state == "queued" else f"running ({st.done}/{st.total})")
                    row[f"state_{b + 1}"] = st.state
                    continue
                v, w, a, k = judged[(short.name, h["id"], b)]
                t = v.test
                p = f"Holm p = {k:.2g} against" if w == "contradicted" else f"Holm p = {a:.2g}"
                cells.append(f"**{w}**: {_num(t.estimate)} [{_num(t.lo)}, {_num(t.hi)}], {p}")
                row.update({f"state_{b + 1}": "complete", f"verdict_{b + 1}": w, f"estimate_{b + 1}": t.estimate,
                            f"lo_{b + 1}": t.lo, f"hi_{b + 1}": t.hi, f"p_holm_{b + 1}": a,
                            f"p_counter_holm_{b + 1}": k})
                edges = [n.split(":")[0] for n in v.notes if "is the grid's" in n]  # computed, not written
                if edges:
                    auto.append(f"budget {b + 1}: {', '.join(edges)} (the optimum may lie outside the grid)")
            v1 = judged[(short.name, h["id"], 0)][0]
            v2 = judged[(short.name, h["id"], 1)][0] if long is not None else None
            if v1 is not None and v2 is not None:
                c = budgets.change(v1.dist, v1.test, v2.dist, v2.test, v1.test.level)
                change = f"{_num(c.estimate)} [{_num(c.lo)}, {_num(c.hi)}]"
                row.update({"change": c.estimate, "change_lo": c.lo, "change_hi": c.hi, "change_method": c.method})
            else:
                change = "–"
            cost = " / ".join(f"{s.cpu_hours:.1f}" if s is not None and math.isfinite(s.cpu_hours) else "–"
                              for s in (short, long))
            type_ = h["type"].replace("_", "-") + (f", δ {h['margin']:g}" if h.get("margin") else "")
            metric = h["contrast"]["metric"]
            lines.append(f"| {claims.get(h['id'], '')} | `{h['id']}` ({metric}, {short.name}) | {type_} | "
                         + " | ".join(cells) + f" | {change} | {cost} | {SOURCE.get(claims.get(h['id'], ''), '')} | "
                         + "; ".join(x for x in (*auto, notes.get(h["id"], "")) if x) + " |")
            rows.append(row)
    level = 1.0 - 2.0 * alpha
    text = "\n".join([
        f"Verdicts computed by `python scripts/findings_v2.py` from the committed journals; Holm across all {m} "
        f"entries (every primary hypothesis at both budgets; unfinished ones counted at p = 1, so with the family "
        f"fixed an interim word can only get stronger), one-sided alpha {alpha:g}; estimates are A − B in the metric's units (test "
        f"split; a probe/ measure: the training trajectory, each run's mean over its probed steps) with {level:.0%} "
        f"intervals; the change between budgets is budget 2 − budget 1 with its "
        f"{level:.0%} interval.", "", head, *lines, ""])
    claims_text = combine(rows, combined)[0]
    return text + ("\n" + claims_text if claims_text else ""), rows


def write(text: str, findings: Path = FINDINGS, table: Path = JOURNALS / "table.md") -> None:
    table.write_text(text)
    doc = findings.read_text()
    pat = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pat.search(doc):
        raise SystemExit(f"{findings}: no {BEGIN} ... {END} block to replace")
    findings.write_text(pat.sub(lambda _: f"{BEGIN}\n{text}{END}", doc))


def clean_tree(root: Path = ROOT, commit: str = "HEAD") -> Path:
    """A git worktree of ``commit`` beside ``root`` (created once per commit, reused): a clean checkout to run
    from."""
    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"findings_v2: git {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout.strip()

    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    tree = root.parent / f"{root.name}-v2run-{sha[:10]}"
    if not (tree / ".git").exists():
        git("worktree", "add", "--detach", str(tree), sha)
    return tree


def study_commit(st: Study) -> str:
    """The commit a study runs from: the one its trials ran (a study stays at one commit when resumed, even after
    HEAD moved on; where earlier trials ran several, the one the newest trial ran), else HEAD (a new study)."""
    return st.commits[-1] if st.commits else "HEAD"


def study_tree(st: Study, root: Path = ROOT) -> Path:
    """``--tree clean``: a clean worktree of ``study_commit(st)``, made when the study starts (not when the queue
    starts), so each new study runs the newest commit and a resumed one the commit it began with. A resumed
    study whose spec differs between that commit and this checkout is refused: a pre-registered spec does not
    change after its first run, and the queue counts trials against this checkout's spec."""
    commit = study_commit(st)
    if commit != "HEAD" and st.spec_path.is_relative_to(root):
        rel = str(st.spec_path.relative_to(root))
        r = subprocess.run(["git", "-C", str(root), "diff", "--quiet", commit, "--", rel], capture_output=True)
        if r.returncode == 1:
            raise SystemExit(f"findings_v2: {st.name}: {rel} differs from the one its trials ran at {commit[:10]} "
                             f"(`git diff {commit[:10]} -- {rel}`): a pre-registered spec does not change after "
                             f"its first run; restore it, or resume by hand with --tree here")
    return clean_tree(root, commit)


def run_queue(spec_dir: Path = SPECS, journal_dir: Path = JOURNALS, order: list[str] | None = ORDER,
              budgets: tuple[int, ...] = (1,), workers: int = 2,
              tree: Path | Callable[[Study], Path] | None = None, only: list[str] | None = None,
              extra: tuple[str, ...] = ()) -> int:
    """Run the unfinished studies (of ``budgets``; ``only``: these names) one after another in the table's order,
    each with ``normablate sweep`` from ``tree`` (None: this process's working directory; a callable: asked for each
    study as it starts). Returns the first non-zero exit status (a stopped or failed sweep: nothing after it
    starts), else 0.

    SIGTERM / SIGINT: forwarded to the running sweep as SIGTERM (it stops cleanly, its trials keep their
    checkpoints), and nothing after it starts. SIGUSR1: the running study finishes, then nothing after it starts (returns 0): the
    way to stop at a study's boundary, e.g. before committing code the next study should run."""
    pairs = studies(spec_dir, journal_dir, order)
    todo = [st for pair in pairs for b, st in enumerate(pair, 1)
            if st is not None and b in budgets and st.state != "complete" and (not only or st.name in only)]
    stop: list[int] = []
    after: list[int] = []
    child: list[subprocess.Popen] = []

    def on_signal(signum, frame):  # forward to the sweep (it stops cleanly) and start nothing after it
        stop.append(signum)
        for c in child:  # as SIGTERM: a terminal's Ctrl-C also reaches the sweep itself, and two SIGINTs would abort
            c.send_signal(signal.SIGTERM)

    def on_usr1(signum, frame):  # let the running study finish; start nothing after it
        after.append(signum)
        print("findings_v2: SIGUSR1: the running study finishes, nothing after it starts", flush=True)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, on_usr1)
    try:
        def halted(name: str) -> int | None:  # the exit status when a signal asked to start nothing more
            if stop:
                return 128 + stop[0]
            if after:
                print(f"findings_v2: stopped before {name} (SIGUSR1)", flush=True)
                return 0
            return None

        for st in todo:
            if (rc := halted(st.name)) is not None:
                return rc
            where = tree(st) if callable(tree) else tree
            if (rc := halted(st.name)) is not None:  # (git may take seconds: a signal meanwhile is seen here)
                return rc
            spec = st.spec_path
            if where is not None and spec.is_relative_to(ROOT):
                spec = where / spec.relative_to(ROOT)  # the committed spec, as the clean tree has it
            print(f"findings_v2: {st.name}: {st.done}/{st.total} trials so far"
                  + (f", from {where}" if where is not None else ""), flush=True)
            env = dict(os.environ, **({"PYTHONPATH": str(where)} if where is not None else {}))
            cmd = [sys.executable, "-m", "normablate", "sweep", "--config", str(spec), "--workers", str(workers),
                   "--storage", f"journal:{st.journal}", *extra]
            # the sweep ignores SIGUSR1 (it is the queue's: sent to the process group, it must not kill the sweep)
            child[:] = [subprocess.Popen(cmd, cwd=where, env=env,
                                         preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))]
            rc = child[0].wait()
            child.clear()  # (a signal from now on has no sweep to forward to)
            if rc != 0 or stop:
                return rc or 128 + stop[0]
        if after:
            print("findings_v2: stopped after the last study (SIGUSR1)", flush=True)
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="write docs/findings/v2/table.md and docs/findings.md")
    ap.add_argument("--run", action="store_true", help="run the unfinished studies in the table's order (resumable)")
    ap.add_argument("--budget", choices=("1", "2", "both"), default="1", help="--run: which budget's studies")
    ap.add_argument("--only", nargs="+", metavar="STUDY", help="--run: only these studies (spec file stems, "
                                                               "either budget)")
    ap.add_argument("--workers", type=int, default=2, help="--run: sweep workers (default 2: 1 thread each)")
    ap.add_argument("--tree", default="clean", help="--run: 'clean' (default: a worktree beside this checkout, made "
                                                    "as each study starts: of HEAD for a new study, of the commit "
                                                    "its trials ran for a resumed one) or 'here' (this checkout)")
    args = ap.parse_args(argv)
    if args.run:
        budgets = (1, 2) if args.budget == "both" or args.only else (int(args.budget),)  # --only: as named
        if args.tree not in ("clean", "here"):
            ap.error(f"--tree {args.tree!r}; valid: clean, here")
        known = {p.stem for p in SPECS.glob("*.yaml")}
        bad = [o for o in args.only or [] if o not in known]
        if bad:
            ap.error(f"--only {' '.join(bad)}: no such study; valid: {', '.join(sorted(known))}")
        if args.workers < 1:
            ap.error(f"--workers {args.workers}: must be >= 1")
        tree = study_tree if args.tree == "clean" else ROOT
        return run_queue(budgets=budgets, workers=args.workers, tree=tree, only=args.only)
    text, _ = build()
    print(text)
    if args.write:
        write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

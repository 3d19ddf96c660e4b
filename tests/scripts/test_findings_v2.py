"""The v2 findings table (scripts/findings_v2.py) and analysis.budgets: the change of an effect between two
budgets, and Holm across a whole document with unfinished studies counted at p = 1."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from normablate.analysis import budgets, verdicts
from normablate.analysis.verdicts import BootDist, TDist
from normablate.analysis.verdicts import Test as VTest

ROOT = Path(__file__).resolve().parents[2]
BASE = str(ROOT / "configs" / "runs" / "quick_synthetic.yaml")


def _test(d, alpha=0.05):
    return verdicts.judge(d, "superiority", None, alpha, "maximize")


def test_change_of_two_t_contrasts_is_welch():
    d1 = TDist(0.10, 0.02, 4.0, "Welch", 3, 3)
    d2 = TDist(0.04, 0.03, 6.0, "Welch", 3, 3)
    c = budgets.change(d1, _test(d1), d2, _test(d2), 0.9)
    se = math.sqrt(0.02 ** 2 + 0.03 ** 2)
    df = (0.02 ** 2 + 0.03 ** 2) ** 2 / (0.02 ** 4 / 4 + 0.03 ** 4 / 6)
    q = verdicts.t_ppf(0.95, df)
    assert c.estimate == pytest.approx(-0.06)
    assert (c.lo, c.hi) == pytest.approx((-0.06 - q * se, -0.06 + q * se))
    assert "Welch" in c.method


def test_change_of_two_bootstraps_matches_the_normal_case():
    """Large-n bootstraps of normal estimates: the change's interval is the normal one of the difference."""
    rng = np.random.default_rng(0)
    n = 200  # seeds: the small-sample factor is ~1
    b1 = BootDist(0.30, rng.normal(0.30, 0.02, 20000), n, "boot", n, n)
    b2 = BootDist(0.20, rng.normal(0.20, 0.04, 20000), n, "boot", n, n)
    c = budgets.change(b1, _test(b1), b2, _test(b2), 0.9)
    half = 1.6449 * math.sqrt(0.02 ** 2 + 0.04 ** 2)
    assert c.estimate == pytest.approx(-0.10)
    assert c.lo == pytest.approx(-0.10 - half, abs=0.004) and c.hi == pytest.approx(-0.10 + half, abs=0.004)
    assert "bootstrap" in c.method



def test_change_of_two_three_seed_bootstraps_is_never_narrower_than_the_welch_t_of_their_floors():
    """At 3 seeds a bootstrap's tails cannot reach the t tail; the change between budgets keeps each study's floor
    (the t contrast at its chosen LRs): its interval contains the Welch t interval of the two t contrasts."""
    def boot(d):
        x = np.asarray(d)
        a = verdicts.Side([0, 1, 2], [0.1], x[:, None], np.zeros((3, 1), bool), x[:, None])
        b = verdicts.Side([0, 1, 2], [0.1], np.zeros((3, 1)), np.zeros((3, 1), bool), np.zeros((3, 1)))
        return verdicts.selection_bootstrap(a, b, "maximize")

    b1, b2 = boot([0.02, -0.02, 0.08]), boot([-0.8, 0.54, 1.94])  # unequal spreads: Welch df near 2
    c = budgets.change(b1, _test(b1), b2, _test(b2), 0.9)
    t = budgets.change(b1.floor, _test(b1.floor), b2.floor, _test(b2.floor), 0.9)
    assert "Welch" in t.method and c.estimate == pytest.approx(t.estimate)
    assert (c.lo, c.hi) == pytest.approx((t.lo, t.hi))  # here the floor is the wider (bootstrap alone: -1.52, 2.59)
    assert "never narrower" in c.method

def test_change_without_distributions_uses_the_intervals():
    t1 = VTest(0.1, 0.0, 0.2, 0.9, 0.04, 0.9)
    t2 = VTest(0.3, 0.2, 0.4, 0.9, 0.01, 0.99)
    c = budgets.change(None, t1, None, t2, 0.9)
    assert c.estimate == pytest.approx(0.2)
    assert c.hi - c.lo == pytest.approx(2 * math.sqrt(2) * 0.1)  # se_i = 0.1/z, recombined at the same z
    assert "normal approximation" in c.method


def test_family_counts_unfinished_at_one_and_is_conservative():
    rng = np.random.default_rng(1)
    for _ in range(200):
        ps = list(rng.uniform(0, 0.1, 6))
        missing = set(rng.choice(6, 2, replace=False).tolist())
        tests = [None if i in missing else VTest(0.0, 0.0, 0.0, 0.9, p, 1.0) for i, p in enumerate(ps)]
        ws, adj, _ = budgets.family(tests, 0.05)
        assert [w for i, w in enumerate(ws) if i in missing] == ["pending", "pending"]
        full = verdicts.holm(ps)  # the same family once the missing studies report any p-values
        for i in range(6):
            if i not in missing:
                assert adj[i] >= full[i] - 1e-12  # the interim adjustment is never the more optimistic one
        assert adj == verdicts.holm([1.0 if i in missing else p for i, p in enumerate(ps)])


def _spec(tmp: Path, name: str, steps: int, seeds: list[int]) -> dict:
    return {"kind": "lr_sensitivity", "base": BASE, "study_name": name, "metric": "val/acc",
            "trainer_fn": "normablate.sweep.dryrun:train", "log_dir": str(tmp / "logs"),
            "overrides": {"trainer.max_steps": steps},
            "grid": {"seed": seeds, "optim.lr": [0.01, 0.1], "model.norm": ["bn", "none"]},
            "hypotheses": [{"id": "bn_beats_none", "claim": '"BN beats no normalization" (a test claim, Fig. 1)',
                            "type": "superiority",
                            "contrast": {"a": {"model.norm": "bn"}, "b": {"model.norm": "none"},
                                         "metric": "test/acc", "at": "best_lr"}}]}


@pytest.mark.slow
def test_table_from_journals_reads_nothing_from_an_unfinished_study(tmp_path, monkeypatch, load_script):
    from normablate.sweep.runner import run_sweep

    fv2 = load_script("findings_v2")
    specs, journals = tmp_path / "specs", tmp_path / "journals"
    specs.mkdir(), journals.mkdir()
    for name, steps in (("alpha", 40), ("alpha_3x", 120), ("beta", 40)):
        (specs / f"{name}.yaml").write_text(yaml.safe_dump(_spec(tmp_path, name, steps, [0, 1, 2])))
    for name in ("alpha", "alpha_3x"):
        assert run_sweep(_spec(tmp_path, name, 40 if name == "alpha" else 120, [0, 1, 2]),
                         storage=f"journal:{journals / name}.journal", verbose=False).complete
    # beta: only seeds 0 and 1 have run (a study still running); beta_3x has no spec; gamma is not in the order
    assert run_sweep(_spec(tmp_path, "beta", 40, [0, 1]), storage=f"journal:{journals / 'beta'}.journal",
                     verbose=False).complete
    from normablate.provenance import git_state

    # the commit its trials ran is read even from a running study: the queue resumes it there
    head = git_state()[0]
    assert fv2.read_study(specs / "beta.yaml", journals).commits == ([head] if head != "unknown" else [])
    import optuna

    from normablate.sweep.storage import normalize_url, open_storage

    storage = open_storage(normalize_url(f"journal:{journals / 'beta'}.journal"))
    beta = optuna.load_study(study_name="beta", storage=storage)
    assert {t.user_attrs.get("git_commit") for t in beta.trials} == {head}  # recorded at each trial's start
    judged = []
    real = verdicts.evaluate
    monkeypatch.setattr(verdicts, "evaluate", lambda data, *a, **k: judged.append(data.name) or real(data, *a, **k))
    text, rows = fv2.build(specs, journals, order=["alpha", "beta"], claims={}, notes={})
    assert sorted(judged) == ["alpha", "alpha_3x"]  # the running study's hypotheses were never evaluated
    alpha, beta = rows
    assert alpha["state_1"] == alpha["state_2"] == "complete" and beta["state_1"] == "running"
    assert "running (8/12)" in text and "no spec" in text
    # the document's family: 4 entries (alpha at 2 budgets, beta at 2), beta's at p = 1
    ps = [alpha["p_holm_1"], alpha["p_holm_2"]]
    raw = []
    for name in ("alpha", "alpha_3x"):
        from normablate.report.data import load

        (v,) = real(load(name, f"journal:{journals / name}.journal"))
        raw.append(v.test.p)
    assert ps == pytest.approx(verdicts.holm(raw + [1.0, 1.0])[:2])
    assert alpha["change"] == pytest.approx(alpha["estimate_2"] - alpha["estimate_1"])
    assert alpha["change_lo"] < alpha["change"] < alpha["change_hi"]
    # --write replaces only the marked block of the findings document
    doc = tmp_path / "findings.md"
    doc.write_text(f"intro\n{fv2.BEGIN}\nold table\n{fv2.END}\nafter\n")
    fv2.write(text, findings=doc, table=tmp_path / "table.md")
    out = doc.read_text()
    assert out.startswith("intro\n") and out.endswith(f"{fv2.END}\nafter\n") and "old table" not in out
    assert text in out and (tmp_path / "table.md").read_text() == text


@pytest.mark.slow
def test_run_queue_runs_the_unfinished_studies_in_order_and_resumes(tmp_path, load_script):
    from normablate.report.data import load

    fv2 = load_script("findings_v2")
    specs, journals = tmp_path / "specs", tmp_path / "journals"
    specs.mkdir(), journals.mkdir()
    for name, steps in (("alpha", 40), ("alpha_3x", 120), ("beta", 40)):
        (specs / f"{name}.yaml").write_text(yaml.safe_dump(_spec(tmp_path, name, steps, [0, 1])))
    # budget 1 only: alpha and beta (in the order given), not alpha_3x
    assert fv2.run_queue(specs, journals, order=["beta", "alpha"], budgets=(1,), workers=1, tree=tmp_path) == 0
    assert sorted(p.name for p in journals.iterdir()) == ["alpha.journal", "beta.journal"]
    assert len(load("alpha", f"journal:{journals / 'alpha'}.journal").trials) == 8
    before = {p.name: p.read_bytes() for p in journals.iterdir()}
    # again, both budgets: the finished ones are skipped (their journals untouched), alpha_3x runs
    assert fv2.run_queue(specs, journals, order=["alpha", "beta"], budgets=(1, 2), workers=1, tree=tmp_path) == 0
    assert all((journals / n).read_bytes() == b for n, b in before.items())
    assert len(load("alpha_3x", f"journal:{journals / 'alpha_3x'}.journal").trials) == 8
    rows = fv2.build(specs, journals, order=["alpha", "beta"], claims={}, notes={})[1]
    assert rows[0]["state_1"] == rows[0]["state_2"] == "complete" and rows[1]["state_1"] == "complete"


def test_every_committed_v2_hypothesis_has_a_claim_number_and_source(load_script):
    """The table's claim column comes from a hand-kept map: a hypothesis renamed or added in a spec without it would
    stand in the table without its claim and source (and a stale entry would name nothing)."""
    from normablate.sweep import load_spec

    fv2 = load_script("findings_v2")
    ids, names = set(), set()
    for path in sorted(fv2.SPECS.glob("*.yaml")):
        names.add(path.stem)
        ids |= {h["id"] for h in load_spec(path).hypotheses}
    assert ids and ids == set(fv2.CLAIM), (ids - set(fv2.CLAIM), set(fv2.CLAIM) - ids)
    assert set(fv2.CLAIM.values()) <= set(fv2.SOURCE)
    assert set(fv2.NOTES) <= ids
    assert set(fv2.ORDER) <= names and all(f"{n}_3x" in names for n in fv2.ORDER)


class _FakeSweep:
    """subprocess.Popen's stand-in for run_queue: records each sweep it would start; ``on_wait`` runs in wait()."""
    started: list = []
    signalled: list = []
    on_wait = None

    def __init__(self, cmd, cwd=None, env=None, preexec_fn=None):
        type(self).started.append((cmd[cmd.index("--config") + 1], cwd, env.get("PYTHONPATH")))

    def wait(self):
        if type(self).on_wait:
            type(self).on_wait()
        return 0

    def send_signal(self, signum):
        type(self).signalled.append(signum)


def test_run_queue_makes_each_studys_tree_as_it_starts_and_sigusr1_stops_at_the_boundary(
        tmp_path, monkeypatch, load_script):
    import os
    import signal
    import subprocess

    fv2 = load_script("findings_v2")
    specs, journals = tmp_path / "specs", tmp_path / "journals"
    specs.mkdir(), journals.mkdir()
    for name in ("alpha", "beta", "gamma"):
        (specs / f"{name}.yaml").write_text(yaml.safe_dump(_spec(tmp_path, name, 40, [0])))
    events = []
    monkeypatch.setattr(subprocess, "Popen", _FakeSweep)
    monkeypatch.setattr(_FakeSweep, "started", [])
    monkeypatch.setattr(_FakeSweep, "signalled", [])
    monkeypatch.setattr(_FakeSweep, "on_wait", lambda: events.append("ran"))

    def tree(st):
        events.append(f"tree {st.name}")
        return tmp_path / f"tree-{st.name}"

    # every study's tree is asked for when that study starts (after the previous one ran), and the sweep runs there
    assert fv2.run_queue(specs, journals, order=["alpha", "beta", "gamma"], workers=1, tree=tree) == 0
    assert events == ["tree alpha", "ran", "tree beta", "ran", "tree gamma", "ran"]
    assert [(cwd.name, pp) for _, cwd, pp in _FakeSweep.started] == [
        (f"tree-{n}", str(tmp_path / f"tree-{n}")) for n in ("alpha", "beta", "gamma")]
    # SIGUSR1 during the first study: it finishes (not signalled), nothing after it starts, the queue returns 0
    _FakeSweep.started.clear()
    monkeypatch.setattr(_FakeSweep, "on_wait", lambda: os.kill(os.getpid(), signal.SIGUSR1))
    before = signal.getsignal(signal.SIGUSR1)
    assert fv2.run_queue(specs, journals, order=["beta", "alpha", "gamma"], workers=1, tree=tree) == 0
    assert [cwd.name for _, cwd, _ in _FakeSweep.started] == ["tree-beta"]
    assert _FakeSweep.signalled == []  # SIGUSR1 is the queue's: never forwarded to the sweep
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is restored
    # SIGINT (a terminal's Ctrl-C) during the first study: passed on as SIGTERM (the sweep got the SIGINT itself, and
    # a second SIGINT would abort it), nothing after it starts, the queue returns 128 + SIGINT
    _FakeSweep.started.clear()
    monkeypatch.setattr(_FakeSweep, "on_wait", lambda: os.kill(os.getpid(), signal.SIGINT))
    assert fv2.run_queue(specs, journals, order=["beta", "alpha", "gamma"], workers=1, tree=tree) == 128 + signal.SIGINT
    assert [cwd.name for _, cwd, _ in _FakeSweep.started] == ["tree-beta"]
    assert _FakeSweep.signalled == [signal.SIGTERM]


def test_study_commit_resumes_at_the_commit_its_trials_ran(load_script):
    fv2 = load_script("findings_v2")
    st = fv2.Study("s", Path("s.yaml"), Path("s.journal"), 4, [])
    assert fv2.study_commit(st) == "HEAD"  # a new study: HEAD as it is when the study starts
    st.commits = ["a" * 40]
    assert fv2.study_commit(st) == "a" * 40
    st.commits = ["a" * 40, "b" * 40]  # trials of several commits (a study resumed by hand): the newest of them
    assert fv2.study_commit(st) == "b" * 40


def test_a_stop_signal_while_the_next_studys_tree_is_made_starts_no_sweep(tmp_path, monkeypatch, load_script):
    """Making a worktree takes seconds (git); a SIGTERM then must not be lost: the next sweep must not start."""
    import os
    import signal
    import subprocess

    fv2 = load_script("findings_v2")
    specs, journals = tmp_path / "specs", tmp_path / "journals"
    specs.mkdir(), journals.mkdir()
    for name in ("alpha", "beta"):
        (specs / f"{name}.yaml").write_text(yaml.safe_dump(_spec(tmp_path, name, 40, [0])))
    monkeypatch.setattr(subprocess, "Popen", _FakeSweep)
    monkeypatch.setattr(_FakeSweep, "started", [])
    monkeypatch.setattr(_FakeSweep, "signalled", [])
    monkeypatch.setattr(_FakeSweep, "on_wait", None)
    before = signal.getsignal(signal.SIGTERM)

    def tree(st):
        if st.name == "beta":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while beta's tree is being made
        return tmp_path / f"tree-{st.name}"

    assert fv2.run_queue(specs, journals, order=["alpha", "beta"], workers=1, tree=tree) == 128 + signal.SIGTERM
    assert [cwd.name for _, cwd, _ in _FakeSweep.started] == ["tree-alpha"]
    assert _FakeSweep.signalled == []  # (alpha's sweep had exited: nothing to forward to)
    assert signal.getsignal(signal.SIGTERM) == before


def test_trial_commits_counts_every_trial_state_in_start_order(tmp_path, load_script):
    """An interrupted or failed trial has no end-of-run versions; its start-time git_commit still counts (its
    checkpoint must be continued by the same code). 'unknown' (no git checkout) is left out. Ordered by each
    commit's last use, so the queue resumes at the commit the newest trial ran."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from normablate.sweep.storage import normalize_url, open_storage

    fv2 = load_script("findings_v2")
    journal = tmp_path / "s.journal"
    study = optuna.create_study(study_name="s", storage=open_storage(normalize_url(f"journal:{journal}")))
    a, b = "a" * 40, "b" * 40
    for state, attrs in ((TrialState.COMPLETE, {"versions": {"git_commit": a}}),  # an older trial: versions only
                         (TrialState.FAIL, {"git_commit": b}),  # interrupted before any result
                         (TrialState.COMPLETE, {"git_commit": "unknown", "versions": {"git_commit": "unknown"}}),
                         (TrialState.FAIL, {"git_commit": a})):
        study.add_trial(create_trial(state=state, user_attrs=attrs,
                                     **({"value": 0.5} if state == TrialState.COMPLETE else {})))
    assert fv2.trial_commits("s", journal) == [b, a]
    assert fv2.trial_commits("other", journal) == []


def test_study_tree_checks_out_the_trials_commit_and_refuses_a_changed_spec(tmp_path, load_script):
    """Against a real repository: a resumed study's worktree is at its trials' commit (not HEAD); a spec changed
    since that commit is refused with the diff to look at; an unknown commit is a clear error, not a traceback."""
    import subprocess

    fv2 = load_script("findings_v2")
    root = tmp_path / "repo"
    (root / "specs").mkdir(parents=True)

    def git(*args):
        return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    spec, other = root / "specs" / "s.yaml", root / "specs" / "other.yaml"
    spec.write_text("grid: {seed: [0]}\n"), other.write_text("x: 1\n")
    git("add", "."), git("commit", "-qm", "a")
    first = git("rev-parse", "HEAD")
    other.write_text("x: 2\n")
    git("commit", "-qam", "b")  # HEAD moves on; s.yaml unchanged
    st = fv2.Study("s", spec, tmp_path / "s.journal", 1, [], commits=[first])
    tree = fv2.study_tree(st, root)
    assert tree == tmp_path / f"repo-v2run-{first[:10]}"
    assert subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip() == first
    assert (tree / "specs" / "other.yaml").read_text() == "x: 1\n"  # the old commit's files, not HEAD's
    assert fv2.study_tree(fv2.Study("new", other, tmp_path / "n.journal", 1, []), root).name.endswith(
        git("rev-parse", "HEAD")[:10])  # a new study: HEAD
    spec.write_text("grid: {seed: [0, 1]}\n")  # the pre-registered spec edited after its first run
    with pytest.raises(SystemExit, match=r"specs/s.yaml differs from the one its trials ran at"):
        fv2.study_tree(st, root)
    with pytest.raises(SystemExit, match=r"findings_v2: git rev-parse .* failed"):
        fv2.clean_tree(root, "f" * 40)


def test_claims_of_two_studies_combine_by_their_fixed_rule(load_script):
    """Claim 6 is answered by shen_powernorm's and 6w's rows together: supported (or contradicted) at a budget only
    where both rows are, inconclusive otherwise, pending while either study runs; the words come from the rows,
    never by hand, and every row the rule names is a committed hypothesis."""
    fv2 = load_script("findings_v2")
    rule = {"9": ("both or nothing", [("q", "a", "b")])}

    def words(wa, wb, state_b="complete"):
        rows = [{"id": "a", "state_1": "complete", "verdict_1": wa, "state_2": "complete", "verdict_2": wa},
                {"id": "b", "state_1": "complete", "verdict_1": wb, "state_2": state_b, "verdict_2": wb}]
        text, out = fv2.combine(rows, rule)
        assert "both or nothing" in text and "`a` + `b`" in text
        return out[0]["verdict_1"], out[0]["verdict_2"]

    assert words("supported", "supported") == ("supported", "supported")
    assert words("contradicted", "contradicted") == ("contradicted", "contradicted")
    assert words("supported", "inconclusive") == ("inconclusive", "inconclusive")
    assert words("supported", "contradicted") == ("inconclusive", "inconclusive")
    assert words("inconclusive", "inconclusive") == ("inconclusive", "inconclusive")
    assert words("supported", "supported", state_b="running") == ("supported", "pending")
    assert fv2.combine([], rule)[1][0]["verdict_1"] == "pending"  # a row not in the table yet
    assert fv2.combine([], {}) == ("", [])
    named = {x for _, qs in fv2.COMBINED.values() for _, a, b in qs for x in (a, b)}
    assert named <= set(fv2.CLAIM), named - set(fv2.CLAIM)
    assert all(fv2.CLAIM[a].rstrip("w") == fv2.CLAIM[b].rstrip("w") == c  # each row answers that claim (6 or 6w)
               for c, (_, qs) in fv2.COMBINED.items() for _, a, b in qs)

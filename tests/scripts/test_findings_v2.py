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

    # the commit its finished trials ran is read even from a running study: the queue resumes it there
    assert fv2.read_study(specs / "beta.yaml", journals).commits == [git_state()[0]]
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
    on_wait = None

    def __init__(self, cmd, cwd=None, env=None):
        type(self).started.append((cmd[cmd.index("--config") + 1], cwd, env.get("PYTHONPATH")))

    def wait(self):
        if type(self).on_wait:
            type(self).on_wait()
        return 0

    def send_signal(self, signum):
        raise AssertionError("SIGUSR1 must not be forwarded to the running sweep")


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
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is restored


def test_study_commit_resumes_at_the_commit_its_trials_ran(load_script):
    fv2 = load_script("findings_v2")
    st = fv2.Study("s", Path("s.yaml"), Path("s.journal"), 4, [])
    assert fv2.study_commit(st) == "HEAD"  # a new study: HEAD as it is when the study starts
    st.commits = ["a" * 40]
    assert fv2.study_commit(st) == "a" * 40
    st.commits = ["a" * 40, "b" * 40]  # trials of several commits (a study resumed by hand): the newest of them
    assert fv2.study_commit(st) == "b" * 40

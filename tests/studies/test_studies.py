"""Study kinds are plug-ins (a kind registered here is usable by sweep and report); statistics without scipy."""
from __future__ import annotations

import copy
import math

import pandas as pd
import pytest

from normablate import studies
from normablate.analysis.stats import t_quantile, t_sf2, welch
from normablate.analysis.tables import conclusion, headline
from normablate.errors import ConfigError
from normablate.report import write_report
from normablate.studies import Section, StudyKind
from normablate.sweep import load_spec, run_sweep

DRY = "normablate.sweep.dryrun:train"
BASE = {"model": {"backbone": "vgg11", "norm": "bn", "width": 0.125},
        "data": {"source": "synthetic", "batch_size": 32, "train_limit": 512, "val_limit": 256},
        "trainer": {"max_steps": 10, "val_every": 5}}


@pytest.fixture
def toy_kind():
    @studies.register("toy_steps")
    class ToySteps(StudyKind):
        """Scales every trial's budget by ``factor``; its report section is a table of steps."""

        keys = ("factor",)
        definition = "* ``toy_steps``: trials run factor x the base steps."

        def check(self, raw, ctx):
            f = raw.get("factor", 2)
            if not isinstance(f, int) or f < 1:
                raise ConfigError(f"{ctx.where}: factor={f!r} must be an integer >= 1")
            return {"factor": f}

        def shape(self, d, options):
            d["trainer"]["max_steps"] = d["trainer"]["max_steps"] * options["factor"]

        def section(self, data, summ, out):
            table = summ[data.group_cols + ["steps_mean"]]
            return Section("## Toy steps\n\nthe toy kind's own section\n", [], {"toy.csv": table})

    yield ToySteps
    studies.REGISTRY.unregister("toy_steps")


def test_a_kind_registered_in_a_test_is_usable_by_sweep_and_report(tmp_path, toy_kind):
    spec = {"kind": "toy_steps", "study_name": "toy", "base": copy.deepcopy(BASE), "log_dir": str(tmp_path / "logs"),
            "trainer_fn": DRY, "factor": 3, "grid": {"model.norm": ["bn", "ln"], "seed": [0, 1]}}
    assert load_spec(spec).total == 4
    res = run_sweep(spec, verbose=False)
    assert res.complete and res.kind == "toy_steps"
    trials = res.study().get_trials()
    assert {t.user_attrs["config"]["trainer"]["max_steps"] for t in trials} == {30}  # the kind shaped the config
    assert {t.user_attrs["steps"] for t in trials} == {30}
    out = write_report("toy", storage=res.storage)
    md = (out / "summary.md").read_text()
    assert "## Toy steps" in md and "toy_steps``: trials run factor" in md and "**Headline:**" in md
    assert list(pd.read_csv(out / "toy.csv")["steps_mean"]) == [30, 30]
    # its keys belong to it: another kind's spec using them is told so; its own checks run
    bad = {**spec, "kind": "grid"}
    with pytest.raises(ConfigError, match="key 'factor' belongs to kind 'toy_steps'"):
        load_spec(bad)
    with pytest.raises(ConfigError, match="factor=0 must be"):
        load_spec({**spec, "factor": 0})


def test_unknown_kind_lists_the_registered_ones(toy_kind):
    with pytest.raises(ConfigError, match="unknown study kind 'toy_step'.*toy_steps.*did you mean 'toy_steps'"):
        load_spec({"kind": "toy_step", "base": BASE, "study_name": "x", "grid": {"seed": [0]}})


def test_sweep_cli_module_does_not_import_report():
    import ast
    import inspect

    import normablate.sweep.cli as sweep_cli

    tree = ast.parse(inspect.getsource(sweep_cli))
    mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in mods if "report" in m], mods
    for pkg in ("analysis", "studies"):  # below sweep and report: they import neither
        import importlib
        import pkgutil

        base = importlib.import_module(f"normablate.{pkg}")
        for info in pkgutil.iter_modules(base.__path__):
            src = inspect.getsource(importlib.import_module(f"normablate.{pkg}.{info.name}"))
            assert "..sweep" not in src and "..report" not in src, f"{pkg}.{info.name} imports sweep/report"


# ------------------------------------------------------------------------------------------ statistics
def test_student_t_against_closed_forms():
    for t in (0.3, 1.0, 2.5, 12.706):  # df = 1 (Cauchy): P(|T| > t) = 1 - 2 atan(t) / pi
        assert t_sf2(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10)
    for t in (0.5, 2.0, 4.303):  # df = 2: P(|T| > t) = 1 - t / sqrt(2 + t^2)
        assert t_sf2(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    assert t_sf2(2.228, 10) == pytest.approx(0.05, abs=2e-4)  # tables
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.975, 30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.960, abs=1e-3)


def test_welch_difference():
    d = welch([0.0, 2.0], [3.0, 5.0])  # equal variances (2), n = 2: df = 2, se = sqrt(2), t = -3 / sqrt(2)
    t = -3 / math.sqrt(2)
    assert (d.diff, d.n_a, d.n_b) == (-3.0, 2, 2) and d.df == pytest.approx(2.0)
    assert d.p == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)
    assert d.ci95 == pytest.approx(4.303 * math.sqrt(2), rel=1e-3) and not d.clear
    d = welch([1.0, 1.1, 0.9, 1.0], [0.0, 0.1, -0.1, 0.05])
    assert d.clear and d.lo > 0 and d.p < 0.001
    assert math.isnan(welch([1.0], [2.0, 3.0]).ci95)  # one seed: no CI


def test_headline_is_honest():
    same = {"bn": [0.50, 0.52, 0.48], "ln": [0.51, 0.47, 0.50]}
    line = headline(same, "maximize", "final val/acc")
    assert line.startswith("No clear difference between") and "CI covers 0" in line
    apart = {"bn": [0.80, 0.82, 0.81], "none": [0.10, 0.11, 0.12], "ln": [0.60, 0.62, 0.61]}
    line = headline(apart, "maximize", "final val/acc")
    assert line.startswith("bn gives the highest final val/acc") and "runner-up ln" in line and "95% CI" in line
    assert "clearly higher than none" in line
    assert "lowest" in headline({"a": [1.0, 1.1], "b": [3.0, 3.1]}, "minimize", "loss")
    c = conclusion(apart, "maximize", "final val/acc")
    assert c.startswith("**Conclusion:** (exploratory) bn has the highest") and "clearly better than none, ln" in c

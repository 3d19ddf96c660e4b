"""What users of TensorBoard, CSV/MLflow/W&B and Optuna see of a run or a sweep (issue 28).

The HPARAMS test reads the experiment and session groups that TensorBoard's own hparams plugin serves, in process
(its data provider over the log folder, its werkzeug routes), as a browser would get them."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from google.protobuf import json_format  # noqa: F401  (tensorboard's dependency: the plugin answers in JSON)

from normablate.config import load_config
from normablate.errors import ConfigError
from normablate.result import RunResult
from normablate.tblog import HPARAMS_DIR, final_metrics
from normablate.train import train

TINY = [
    "model.backbone=resnet20", "model.width=4", "data.source=synthetic", "data.batch_size=32",
    "data.train_limit=512", "data.val_limit=64", "data.test_limit=64", "data.val_batch_size=64",
    "data.augment=false", "optim.name=adamw", "optim.lr=3e-3", "trainer.max_steps=4", "trainer.val_every=2",
    "trainer.progress=false",
]


def cfg_for(tmp_path, *extra):
    return load_config(None, [*TINY, f"trainer.log_dir={tmp_path}", "experiment=views", *extra])


def hparams_plugin(logdir: Path):
    """TensorBoard's hparams plugin over ``logdir``, as ``tensorboard --logdir`` builds it, with a client to ask it."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams.hparams_plugin import HParamsPlugin
    from werkzeug import Client, Request
    from werkzeug.wrappers import Response

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    ctx = base_plugin.TBContext(logdir=str(logdir), multiplexer=mux,
                                data_provider=data_provider.MultiplexerDataProvider(mux, str(logdir)))
    routes = HParamsPlugin(ctx).get_plugin_apps()

    def app(environ, start_response):
        return routes[Request(environ).path](environ, start_response)

    client = Client(app, Response)

    def post(route: str, body: dict) -> dict:
        r = client.post(route, data=json.dumps(body), content_type="application/json",
                        headers={"X-TensorBoard-Experiment-Id": ""})
        assert r.status_code == 200, r.get_data(as_text=True)
        return json.loads(r.get_data(as_text=True))

    return post


def session_groups(post) -> list[dict]:
    return post("/session_groups", {"experimentName": "", "startIndex": 0, "sliceSize": 100,
                                    "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN", "STATUS_RUNNING"],
                                    "colParams": []})["sessionGroups"]


@pytest.mark.slow
def test_hparams_view_shows_the_answer_first_and_every_run(tmp_path):
    """BN vs none, two runs: the five metrics TensorBoard shows by default are the validation and test metrics and
    run/diverged; the BN-only train/eval gap exists for BN and is absent (not NaN) for none; every shown metric has
    a value in every session (the parallel-coordinates view drops a session lacking one)."""
    results = {norm: train(cfg_for(tmp_path, f"model.norm={norm}")) for norm in ("bn", "none")}
    post = hparams_plugin(tmp_path)
    exp = post("/experiment", {"experimentName": ""})
    metrics = [m["name"]["tag"] for m in exp["metricInfos"]]
    shown = metrics[:5]  # TensorBoard's dashboard displays the first five metric columns (tf-hparams-query-pane)
    assert shown == ["hp/test_acc", "hp/test_loss", "hp/val_acc", "hp/val_loss", "run/diverged"], metrics
    assert "run/train_eval_gap" in metrics and "grad_norm" not in metrics and "val/acc" not in metrics
    infos = {h["name"]: h for h in exp["hparamInfos"]}
    assert infos["model.norm"]["differs"] and not infos["optim.lr"]["differs"]
    groups = session_groups(post)
    assert len(groups) == 2
    by_norm = {g["hparams"]["model.norm"]: g for g in groups}
    for norm, g in by_norm.items():
        values = {m["name"]["tag"]: m["value"] for m in g["metricValues"]}
        assert set(shown) <= set(values), (norm, values)
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in values.values()), values
        r = results[norm]
        assert values["hp/val_acc"] == pytest.approx(r.final["val/acc"])
        assert values["hp/test_acc"] == pytest.approx(r.test["test/acc"])
        assert values["run/diverged"] == 0.0
        steps = {m["name"]["tag"]: m["trainingStep"] for m in g["metricValues"]}
        acc = EventAccumulator(r.run_dir)
        acc.Reload()  # the final metrics sit at the step of the last validation (one evaluation's numbers)
        assert steps["hp/val_acc"] == acc.Scalars("val/acc")[-1].step, steps
    assert "run/train_eval_gap" in {m["name"]["tag"] for m in by_norm["bn"]["metricValues"]}
    assert "run/train_eval_gap" not in {m["name"]["tag"] for m in by_norm["none"]["metricValues"]}
    # the HPARAMS folder holds the session and the final metrics only; the run's curves stay in the run folder
    assert (Path(results["bn"].run_dir) / HPARAMS_DIR).is_dir()


def test_final_metrics_leave_out_what_does_not_apply():
    r = RunResult(run_dir="x", status="diverged", steps=7, final={"val/loss": float("nan"), "val/acc": 0.1},
                  throughput=5.0)
    m = final_metrics(r, "classification")
    assert m == {"hp/val_acc": 0.1, "run/diverged": 1.0, "run/steps": 7.0, "run/throughput": 5.0}
    r = RunResult(run_dir="x", status="completed", steps=7, final={"val/loss": 2.0, "val/ppl": 7.4})
    r.test, r.test_at_best = {"test/loss": 2.1, "test/ppl": 8.2}, {}
    m = final_metrics(r, "lm")
    assert sorted(m)[:4] == ["hp/test_loss", "hp/test_ppl", "hp/val_loss", "hp/val_ppl"]
    assert m["run/test_ppl_at_best"] == 8.2  # the final checkpoint was the best one: its test value


# ------------------------------------------------------------------------------------------ Optuna
DRY_SPEC = {
    "kind": "grid", "study_name": "v", "trainer_fn": "normablate.sweep.dryrun:train",
    "base": {"model": {"backbone": "vgg11", "norm": "bn", "width": 0.125},
             "data": {"source": "synthetic", "batch_size": 32, "train_limit": 512, "val_limit": 256},
             "optim": {"lr": 0.1}, "trainer": {"max_steps": 20, "val_every": 5}},
    "grid": {"seed": [0, 1], "model.norm": ["bn", "none"]},
}


def dry_sweep(tmp_path: Path, **kw):
    from normablate.sweep import run_sweep

    spec = {**json.loads(json.dumps(DRY_SPEC)), "log_dir": str(tmp_path / "logs"), **kw}
    url = f"sqlite:///{tmp_path / 'logs' / 'optuna.db'}"
    res = run_sweep(spec, url, verbose=False)
    assert res.exit_code == 0 and res.counts.done == 4
    return url


def test_optuna_study_names_its_metric_reports_curves_and_shows_the_seed(tmp_path):
    import optuna

    from normablate.sweep.queue import ATTR, SPEC_ATTR
    from normablate.sweep.storage import open_storage

    url = dry_sweep(tmp_path)  # no pruner
    st = open_storage(url)
    study = optuna.load_study(study_name="v", storage=st)
    assert study.metric_names == ["val/acc"]
    trials = study.get_trials(deepcopy=False)
    assert sorted((t.params["seed"], t.params["model.norm"]) for t in trials) == [
        (0, "bn"), (0, "none"), (1, "bn"), (1, "none")]
    for t in trials:  # every validation reported (steps 5, 10, 15, 20), matching the recorded final value
        assert sorted(t.intermediate_values) == [5, 10, 15, 20], t.intermediate_values
        assert t.intermediate_values[20] == pytest.approx(t.user_attrs["final"]["val/acc"])
        assert t.state == optuna.trial.TrialState.COMPLETE
    # `optuna studies` prints the user attributes: a compact one, the spec lives in a system attribute
    summary = {s.study_name: s for s in optuna.get_all_study_summaries(st, include_best_trial=False)}["v"]
    assert summary.user_attrs[ATTR] == {"kind": "grid", "metric": "val/acc", "direction": "maximize",
                                        "total": 4, "fingerprint": summary.user_attrs[ATTR]["fingerprint"]}
    assert len(json.dumps(summary.user_attrs)) < 200
    assert st.get_study_system_attrs(study._study_id)[SPEC_ATTR]["spec"]["grid"]["seed"] == [0, 1]


def test_reporting_without_a_pruner_prunes_nothing_and_with_one_still_prunes(tmp_path):
    """The report at every validation changes nothing without a pruner (NopPruner: should_prune never asked), and a
    pruner still prunes from the same reports."""
    from normablate.sweep.pruning import OptunaPruning

    class Trial:
        def __init__(self, verdict):
            self.reports, self.asked, self.verdict = [], 0, verdict

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            self.asked += 1
            return self.verdict

    import optuna
    from types import SimpleNamespace

    trainer = SimpleNamespace(callback_metrics={"val/acc": 0.5}, global_step=10, sanity_checking=False, callbacks=[])
    quiet = Trial(verdict=True)
    OptunaPruning(quiet, "val/acc", prune=False).on_validation_end(trainer, None)
    assert quiet.reports == [(10, 0.5)] and quiet.asked == 0
    loud = Trial(verdict=True)
    with pytest.raises(optuna.TrialPruned):
        OptunaPruning(loud, "val/acc").on_validation_end(trainer, None)
    assert loud.reports == [(10, 0.5)] and loud.asked == 1


def test_an_old_study_with_the_whole_spec_in_its_user_attribute_still_loads(tmp_path):
    """A study made before the compact attribute: the report reads it, a re-run joins it (same fingerprint) and gives
    it its metric name."""
    import optuna

    from normablate.report.data import load
    from normablate.sweep import load_spec
    from normablate.sweep.queue import ATTR, SPEC_ATTR, READY
    from normablate.sweep.storage import open_storage

    url = dry_sweep(tmp_path)
    st = open_storage(url)
    study = optuna.load_study(study_name="v", storage=st)
    full = st.get_study_system_attrs(study._study_id)[SPEC_ATTR]
    # rewrite it as an older version left it: the whole record in the user attribute, no system attribute
    st.set_study_system_attr(study._study_id, SPEC_ATTR, None)
    st.set_study_system_attr(study._study_id, "study:metric_names", None)
    study.set_user_attr(ATTR, full)
    assert study.user_attrs[READY]
    data = load("v", url)
    assert len(data.trials) == 4 and data.spec.metric == "val/acc"
    spec = {**json.loads(json.dumps(DRY_SPEC)), "log_dir": str(tmp_path / "logs")}
    from normablate.sweep.runner import Sweep

    sweep = Sweep(load_spec(spec), url, verbose=False)
    sweep.setup(create=True)  # loads it: the same sweep, nothing re-queued
    assert sweep.counts().done == 4
    assert optuna.load_study(study_name="v", storage=st).metric_names == ["val/acc"]


# ------------------------------------------------------------------------------------------ loggers
@pytest.mark.slow
def test_csv_logger_writes_hparams_and_metrics_into_the_run_folder(tmp_path):
    import csv

    import yaml

    r = train(cfg_for(tmp_path, "model.norm=bn", "trainer.loggers=[tensorboard, csv]"))
    run_dir = Path(r.run_dir)
    hp = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hp["model.norm"] == "bn" and hp["optim.lr"] == pytest.approx(3e-3)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    last = {k: v for row in rows for k, v in row.items() if v not in ("", None)}  # last value of each column
    assert float(last["hp/val_acc"]) == pytest.approx(r.final["val/acc"])
    assert float(last["hp/test_acc"]) == pytest.approx(r.test["test/acc"])
    assert "val/loss" in last and "epoch" not in rows[0]
    assert (run_dir / HPARAMS_DIR).is_dir()  # TensorBoard too


@pytest.mark.slow
def test_unknown_or_missing_logger_is_a_config_error(tmp_path, monkeypatch):
    import importlib.util

    with pytest.raises(ConfigError, match=r"trainer.loggers: unknown logger 'comet'; valid: tensorboard, csv"):
        cfg_for(tmp_path, "trainer.loggers=[comet]")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"includes 'wandb' but the wandb package is not installed: pip install "
                                          r"'normablate\[wandb\]'"):
        cfg_for(tmp_path, "trainer.loggers=[tensorboard, wandb]")
    r = train(cfg_for(tmp_path, "trainer.loggers=[]", "trainer.max_steps=2"))  # none at all is allowed
    assert r.status == "completed" and not (Path(r.run_dir) / HPARAMS_DIR).exists()


@pytest.mark.slow
def test_mlflow_logger_gets_params_and_final_metrics(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")  # the optional extra .[mlflow]; CI installs .[test] only, so this skips there
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = train(cfg_for(tmp_path, "model.norm=bn", "trainer.loggers=[mlflow]"))
    client = mlflow.tracking.MlflowClient((tmp_path / "mlruns").as_uri())  # the default: a file store in log_dir
    run_id = (Path(r.run_dir) / ".mlflow_run_id").read_text()
    run = client.get_run(run_id)
    assert run.info.run_name == Path(r.run_dir).name and run.info.status == "FINISHED"
    assert run.data.params["model.norm"] == "bn" and float(run.data.params["optim.lr"]) == pytest.approx(3e-3)
    assert run.data.metrics["hp/val_acc"] == pytest.approx(r.final["val/acc"])
    assert run.data.metrics["hp/test_acc"] == pytest.approx(r.test["test/acc"])
    assert "val/loss" in run.data.metrics  # the curves as well
    assert client.get_experiment(run.info.experiment_id).name == "views"


@pytest.mark.slow
def test_wandb_logger_offline_gets_config_and_summary(tmp_path, monkeypatch):
    """The run's W&B config and summary as they are when train() finishes the W&B run (offline, a run keeps them in
    its binary .wandb file until `wandb sync`)."""
    pytest.importorskip("wandb")  # the optional extra .[wandb]; CI installs .[test] only, so this skips there
    from normablate import tblog, train as train_module

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen = {}
    real_finish = tblog.finish

    def finish(loggers, status):
        run = next(lg for lg in loggers if type(lg).__name__ == "WandbLogger").experiment
        seen.update(config=dict(run.config), summary=dict(run.summary), name=run.name, project=run.project)
        real_finish(loggers, status)

    monkeypatch.setattr(train_module, "finish", finish)
    r = train(cfg_for(tmp_path, "model.norm=bn", "trainer.loggers=[wandb]"))
    assert seen["config"]["model.norm"] == "bn" and seen["config"]["optim.lr"] == pytest.approx(3e-3)
    assert seen["summary"]["hp/val_acc"] == pytest.approx(r.final["val/acc"])
    assert seen["summary"]["hp/test_acc"] == pytest.approx(r.test["test/acc"])
    assert seen["name"] == Path(r.run_dir).name and seen["project"] == "views"
    run_id = (Path(r.run_dir) / ".wandb_run_id").read_text()  # a resumed run continues this W&B run
    assert len(list((Path(r.run_dir) / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))) == 1


# ------------------------------------------------------------------------------------------ live progress
class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_board_plain_lines_are_rate_limited(monkeypatch):
    """Not a terminal: a worker's line at its first event, then only after 30 s or another tenth of its trial."""
    import io

    from normablate import progress

    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    board = progress.Board(out=out, tty=False)
    ev = {"worker": "w0", "trial": 3, "label": "bn s0", "total": 1000, "metric": "val/acc", "value": None}
    for step in range(0, 95, 5):  # 0..90: below a tenth after the first line, within 30 s
        clock.t += 1
        board.update({**ev, "step": step, "eta": 100.0})
    assert out.getvalue().splitlines() == ["w0 trial 3 bn s0: step 0/1000 (0%) ETA 1:40"]
    clock.t += 1
    board.update({**ev, "step": 100, "value": 0.5, "eta": 90.0})  # a tenth further
    clock.t += 31
    board.update({**ev, "step": 101, "value": 0.5, "eta": 89.0})  # 31 s later
    lines = out.getvalue().splitlines()
    assert lines[1:] == ["w0 trial 3 bn s0: step 100/1000 (10%) val/acc 0.5 ETA 1:30",
                         "w0 trial 3 bn s0: step 101/1000 (10%) val/acc 0.5 ETA 1:29"]
    board.update({"log": "[s/w0] trial 3 finished"})
    assert out.getvalue().splitlines()[-1] == "[s/w0] trial 3 finished" and "\x1b" not in out.getvalue()


def test_board_on_a_terminal_redraws_one_line_per_worker_and_the_study(monkeypatch):
    import io

    from normablate import progress

    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    board = progress.Board(out=out, tty=True)
    board.update({"study": "[s] 2/10 trials done", "remaining": 8, "eta": None})
    for w, step in (("w0", 50), ("w1", 25)):
        clock.t += 1
        board.update({"worker": w, "trial": int(w[1]), "label": "", "step": step, "total": 100, "metric": "val/acc",
                      "value": None, "eta": 50.0 if w == "w0" else 75.0})
    assert board.lines() == ["w0 trial 0: step 50/100 (50%) ETA 0:50", "w1 trial 1: step 25/100 (25%) ETA 1:15",
                             "[s] 2/10 trials done, 2 running | ETA 4:12"]
    # the study's ETA: the running trials' 50 + 75 s left, plus 8 - 2 trials not started at the running ones' mean
    # length ((1 s so far + 50) + (0 + 75)) / 2 = 63 s, over 2 workers: (125 + 6 * 63) / 2 = 251.5 s
    screen = out.getvalue()
    assert screen.count("\x1b[J") >= 2  # each redraw erases the previous block first
    board.update({"log": "[s/w0] trial 0 -> val/acc 0.6"})  # a log line goes above the block, which is drawn again
    tail = out.getvalue()[len(screen):]
    assert tail.startswith("\x1b[3F\x1b[J[s/w0] trial 0 -> val/acc 0.6\n") and tail.endswith("ETA 4:12\n")
    board.update({"worker": "w0", "done": True})
    assert board.lines()[0].startswith("w1 trial 1")


@pytest.mark.slow
def test_sweep_workers_send_progress_and_log_lines_to_the_command(tmp_path, capsys):
    """Two worker processes: their trial progress (step/total, metric) and log lines reach the sweep command's
    output through the progress queue, as plain lines (captured output is not a terminal)."""
    import re

    from normablate.sweep import run_sweep

    spec = {**json.loads(json.dumps(DRY_SPEC)), "log_dir": str(tmp_path / "logs")}
    res = run_sweep(spec, f"sqlite:///{tmp_path / 'logs' / 'optuna.db'}", workers=2)
    assert res.exit_code == 0
    out = capsys.readouterr().out
    progress = re.findall(r"^(w[01]) trial (\d+) .*: step (\d+)/20 \(\d+%\)(?: val/acc [\d.]+)? ETA", out, re.M)
    started = set(re.findall(r"^\[v/(w[01])\] trial \d+ started", out, re.M))  # the workers' own log lines
    # every worker that ran a trial showed its progress (which worker claims which trial is the scheduler's: under
    # load one worker may finish all four before the other has started, so both are not required)
    assert started and {w for w, _, _ in progress} == started, out
    assert {int(t) for _, t, _ in progress} == {0, 1, 2, 3}, out  # every trial showed its progress
    assert "finished: 4/4 trials done" in out


def test_finish_maps_an_interrupted_run_to_each_loggers_vocabulary():
    """MLflow refuses a run status it does not know: an interrupted run ends its MLflow run as KILLED."""
    from normablate import tblog

    class Logger:
        def __init__(self):
            self.statuses = []

        def finalize(self, status):
            self.statuses.append(status)

    MLFlow = type("MLFlow", (Logger,), {})  # the class name tblog's MLflow logger has
    tb, ml = Logger(), MLFlow()
    tblog.finish([tb, ml], "interrupted")
    tblog.finish([tb, ml], "success")
    assert tb.statuses == ["interrupted", "success"] and ml.statuses == ["KILLED", "success"]

"""Three splits: the test split is evaluated once at the end of a run and never reaches a selection; `normablate
evaluate` re-evaluates a run folder (also one written before the splits existed)."""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import optuna
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from normablate.data import synthetic
from normablate.errors import ConfigError
from normablate.evaluate import evaluate_run
from normablate.sweep import run_sweep
from normablate.sweep.storage import open_storage
from normablate.train import train

TINY = ["model.backbone=resnet20", "model.width=4", "data.source=synthetic", "data.batch_size=32",
        "data.train_limit=512", "data.val_limit=128", "data.test_limit=160", "data.val_batch_size=64",
        "data.augment=false", "optim.name=adamw", "optim.lr=0.003", "trainer.max_steps=12", "trainer.val_every=4",
        "trainer.progress=false", "trainer.threads=1"]


def overrides(tmp_path: Path, *extra: str):
    from normablate.config import load_config

    return load_config(None, [*TINY, f"trainer.log_dir={tmp_path / 'logs'}", *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny BN run whose best validation accuracy comes before its last step (so test_at_best is set)."""
    tmp = tmp_path_factory.mktemp("run")
    for lr in ("0.003", "0.03", "0.1"):  # find an LR whose best validation is not the last one (deterministic)
        r = train(overrides(tmp, f"optim.lr={lr}", f"run=lr{lr}"))
        if r.best_step != r.steps:
            return r
    pytest.fail("no tiny run had its best validation before the end; pick other settings")


def test_run_records_test_split(finished):
    r = finished
    # with running statistics, and (the model has BN, the gap is on) with batch statistics and their difference
    keys = {"test/loss", "test/acc", "test/loss_batchstats", "test/acc_batchstats", "test/train_eval_gap"}
    assert r.status == "completed" and set(r.test) == keys
    assert set(r.test_at_best) == keys and r.test_at_best != r.test
    run_dir = Path(r.run_dir)
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["step"] == r.best_step and best["metric"] == "val/acc"
    assert best["value"] == pytest.approx(max(v for _, v in r.history["val/acc"]))
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["test"] == pytest.approx(r.test) and saved["test_at_best"] == pytest.approx(r.test_at_best)
    # the test numbers are not the validation numbers (another split), and the validation curve is unchanged
    assert r.test["test/loss"] != r.final["val/loss"]


def test_evaluate_reproduces_the_recorded_numbers(finished):
    r = finished
    running = {k: v for k, v in r.test.items() if k in ("test/loss", "test/acc")}
    last = evaluate_run(r.run_dir, "test")
    assert last["metrics"] == pytest.approx(running, abs=1e-6) and last["step"] == r.steps
    batch = evaluate_run(r.run_dir, "test", stats="batch", write=False)  # = the end-of-run gap pass
    assert batch["metrics"]["test/loss"] == pytest.approx(r.test["test/loss_batchstats"], abs=1e-6)
    assert Path(last["file"]).name == "last-test-running.json" and json.loads(Path(last["file"]).read_text())
    best = evaluate_run(r.run_dir, "test", checkpoint="best")
    at_best = {k: v for k, v in r.test_at_best.items() if k in ("test/loss", "test/acc")}
    assert best["metrics"] == pytest.approx(at_best, abs=1e-6) and best["step"] == r.best_step
    val = evaluate_run(r.run_dir, "val", stats="batch", write=False)  # = the last validation's batch-stats pass
    assert val["metrics"]["val/loss"] == pytest.approx(r.final["val/loss_batchstats"], abs=1e-6)
    assert val["metrics"]["val/acc"] == pytest.approx(r.final["val/acc_batchstats"], abs=1e-6)
    precise = evaluate_run(r.run_dir, "test", stats="precise", precise_batches=4, write=False)
    assert precise["precise_batches"] == 4 and precise["metrics"] != last["metrics"]


def test_evaluate_old_run_folder(finished, tmp_path):
    """A folder written before the splits: its config says val_split: test and has no test_split."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(finished.run_dir, old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    del cfg["data"]["test_split"], cfg["data"]["test_fraction"], cfg["data"]["test_limit"]
    cfg["data"]["val_split"] = "test"
    cfg["data"]["val_limit"] = 160
    cfg["trainer"].pop("select_metric", None)
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    rec = evaluate_run(old, "test")
    assert "not held out from selection" in rec["note"] and set(rec["metrics"]) == {"test/loss", "test/acc"}
    with pytest.raises(ConfigError, match="no untouched validation set"):
        evaluate_run(old, "val")
    with pytest.raises(ConfigError, match="no run folder"):
        evaluate_run(tmp_path / "nothing")


def test_split_keys_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"data.val_split and data.test_split both name split 'test'"):
        overrides(tmp_path, "data.val_split=test")
    with pytest.raises(ConfigError, match=r"data.test_split='train' is also data.train_split"):
        overrides(tmp_path, "data.test_split=train")
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.5 \+ data.test_fraction=0.5"):
        overrides(tmp_path, "data.val_fraction=0.5", "data.test_fraction=0.5")
    with pytest.raises(ConfigError, match=r"trainer.select_metric='test/acc' is not allowed"):
        overrides(tmp_path, "trainer.select_metric=test/acc")
    assert not (tmp_path / "logs").exists()


# ------------------------------------------------------------------------------ poisoned test labels
def _write_images(root: Path, poison: bool) -> None:
    """A two-split parquet source (train 600, test 200) of the embedded images; ``poison`` shifts every test label."""
    root.mkdir(parents=True)
    x, y = synthetic.images(800, seed=11)
    for split, sl in (("train", slice(0, 600)), ("test", slice(600, 800))):
        blobs = []
        for img in x[sl]:
            buf = io.BytesIO()
            Image.fromarray(img.permute(1, 2, 0).numpy().astype(np.uint8)).save(buf, format="PNG")
            blobs.append({"bytes": buf.getvalue(), "path": None})
        labels = y[sl].tolist()
        if poison and split == "test":
            labels = [(v + 3) % 10 for v in labels]
        pq.write_table(pa.table({"img": blobs, "label": labels}), root / f"{split}.parquet")


@pytest.mark.slow
def test_poisoned_test_labels_change_no_selection(tmp_path):
    """Everything a sweep chooses (objective values, best LR per norm, the best-validation step kept for
    test_at_best) is identical when the test split's labels are garbage; only the reported test numbers move."""
    studies = {}
    for name in ("clean", "poisoned"):
        src = tmp_path / name / "data"
        _write_images(src, poison=name == "poisoned")
        spec = {"kind": "lr_sensitivity", "study_name": "s", "log_dir": str(tmp_path / name / "logs"),
                "metric": "val/acc", "metric_at": "best", "tolerance": 0.05,
                "base": {"model": {"backbone": "resnet20", "width": 4},
                         "data": {"source": str(src), "batch_size": 32, "val_batch_size": 60, "augment": False,
                                  "cache_dir": str(tmp_path / name / "cache")},
                         "optim": {"name": "adamw"}, "trainer": {"max_steps": 9, "val_every": 3, "threads": 1}},
                "grid": {"seed": [0], "optim.lr": [0.003, 0.03], "model.norm": ["bn", "none"]}}
        res = run_sweep(copy.deepcopy(spec), verbose=False)
        assert res.complete
        url = f"sqlite:///{tmp_path / name / 'logs' / 'optuna.db'}"
        trials = optuna.load_study(study_name="s", storage=open_storage(url)).get_trials()
        studies[name] = {json.dumps(t.params, sort_keys=True) if t.params else t.user_attrs["run"]: t
                         for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    clean, poisoned = studies["clean"], studies["poisoned"]
    assert clean.keys() == poisoned.keys() and len(clean) == 4
    for k in clean:
        a, b = clean[k], poisoned[k]
        assert a.value == b.value, k  # the objective (validation) is bit-identical
        for attr in ("final", "best", "best_step", "steps_to_target", "diverged"):
            assert a.user_attrs[attr] == b.user_attrs[attr], (k, attr)
        assert a.user_attrs["test"] != b.user_attrs["test"], k  # ... and the test numbers saw the poison
        assert b.user_attrs["test"]["test/acc"] < 0.5 * a.user_attrs["test"]["test/acc"] + 0.1

    def best_lr(trials):  # the best-LR rule on the objective (validation), per norm
        out = {}
        for t in trials.values():
            norm, lr = t.user_attrs["config"]["model"]["norm"], t.user_attrs["config"]["optim"]["lr"]
            if norm not in out or t.value > out[norm][1]:
                out[norm] = (lr, t.value)
        return out

    assert best_lr(clean) == best_lr(poisoned)

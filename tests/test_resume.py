"""Issue 25, part B: a resumed run is the run it claims to be (stored config and threads, nothing written before the
checks), input ranges, the memory estimate, and the sweep preflight.

Most checks use a checkpoint written with ``torch.save`` holding what ``RunIdentity`` stores, so they exercise
``train()``'s refusal path (which ends before any data is read) in well under a second; one slow test trains."""
from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from normablate import footprint, runfolder
from normablate.cli import main
from normablate.config import load_config, to_dict
from normablate.errors import ConfigError
from normablate.result import RunResult
from normablate.train import train

TINY = ["model.backbone=resnet20", "model.width=4", "data.source=synthetic", "data.batch_size=16",
        "data.train_limit=256", "data.val_limit=32", "data.test_limit=32", "data.val_batch_size=32",
        "data.augment=false", "optim.name=adamw", "optim.lr=3e-3", "trainer.max_steps=6", "trainer.val_every=3",
        "trainer.progress=false", "trainer.batchstat_gap='off'"]


def cfg_of(tmp_path: Path, *extra: str):
    return load_config(None, [*TINY, f"trainer.log_dir={tmp_path}", "experiment=t", "run=r", *extra])


def fake_checkpoint(tmp_path: Path, *extra: str, threads: int = 3, identity: bool = True) -> Path:
    """A run folder as an interrupted run leaves it: config.yaml and a last.ckpt holding its identity."""
    cfg = cfg_of(tmp_path, *extra)
    run_dir = runfolder.run_dir_of(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("original: true\n")
    state = {"global_step": 3, "state_dict": {"w": torch.zeros(2)}}
    if identity:
        state[runfolder.IDENTITY_KEY] = {"format": 1, "config": to_dict(cfg), "torch_threads": threads}
    torch.save(state, run_dir / "last.ckpt")
    return run_dir


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ identity
def test_resume_with_another_config_is_refused_before_anything_is_written(tmp_path):
    run_dir = fake_checkpoint(tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(ConfigError) as e:
        train(cfg_of(tmp_path, "optim.lr=0.1", "model.width=8"), resume=True)
    msg = str(e.value)
    assert "optim.lr: 0.003 -> 0.1" in msg and "model.width: 4 -> 8" in msg and "step 3" in msg
    assert snapshot(run_dir) == before  # config.yaml not overwritten, no resumes.jsonl, no versions.json


def test_compare_classifies_keys():
    base = to_dict(load_config(None, TINY))
    new = json.loads(json.dumps(base))
    new["trainer"].update(progress=True, log_every=1, max_steps=12, val_batches=2)
    new["data"]["cache_dir"] = "/elsewhere"
    d = runfolder.compare(base, new)
    assert set(d.allowed) == {"trainer.progress", "trainer.log_every", "trainer.max_steps", "data.cache_dir"}
    assert d.allowed["trainer.max_steps"] == (6, 12)
    assert set(d.refused) == {"trainer.val_batches"}  # the validation set the metrics are measured on
    shorter = json.loads(json.dumps(base))
    shorter["trainer"]["max_steps"] = 4
    assert set(runfolder.compare(base, shorter).refused) == {"trainer.max_steps"}  # a budget only grows
    # a key the stored config lacks (written before it existed) is the same run at its default, not otherwise
    older = json.loads(json.dumps(base))
    del older["trainer"]["allow_thread_change"], older["optim"]["min_lr_ratio"]
    assert runfolder.compare(older, base).refused == {}
    changed = json.loads(json.dumps(base))
    changed["optim"]["min_lr_ratio"] = 0.5
    assert set(runfolder.compare(older, changed).refused) == {"optim.min_lr_ratio"}
    # a budget in epochs: the stored config holds the steps it resolved to, the new one leaves them null
    stored = to_dict(load_config(None, [*TINY, "trainer.max_steps=null", "trainer.max_epochs=2"]))
    asked = json.loads(json.dumps(stored))
    stored["trainer"]["max_steps"] = 32
    d = runfolder.compare(stored, asked)
    assert d.refused == {} and d.allowed == {}
    asked["trainer"]["max_epochs"] = 3
    assert runfolder.compare(stored, asked).allowed == {"trainer.max_epochs": (2, 3)}
    # a model option given on one side only counts as the backbone's default
    explicit = json.loads(json.dumps(base))
    explicit["model"]["in_chans"] = 3
    assert runfolder.compare(base, explicit).refused == {}


def test_threads_are_restored_refused_or_allowed_and_recorded(tmp_path):
    fake_checkpoint(tmp_path, threads=3)
    cfg = cfg_of(tmp_path)  # trainer.threads unset: the run's own count comes back
    folder = runfolder.prepare(cfg, resume=True)
    assert folder.resuming and folder.identity == "checked" and cfg.trainer.threads == 3
    assert folder.threads["how"] == "restored" and folder.threads["before"] == 3
    assert runfolder.prepare(cfg_of(tmp_path, "trainer.threads=3"), resume=True).threads["how"] == "same"
    with pytest.raises(ConfigError, match=r"trainer.threads=5: the run .* ran with 3 torch thread\(s\).*"
                                          r"trainer.allow_thread_change=true"):
        runfolder.prepare(cfg_of(tmp_path, "trainer.threads=5"), resume=True)
    cfg = cfg_of(tmp_path, "trainer.threads=5", "trainer.allow_thread_change=true")
    folder = runfolder.prepare(cfg, resume=True)
    assert cfg.trainer.threads == 5 and folder.threads["how"].startswith("changed")
    assert folder.changes == {"trainer.allow_thread_change": (False, True)}
    runfolder.start(folder, cfg, {})
    line = json.loads((folder.run_dir / runfolder.RESUMES).read_text().splitlines()[-1])
    assert line["threads"]["before"] == 3 and line["threads"]["now"] == 5 and line["step"] == 3


def test_checkpoint_without_identity_resumes_with_one_warning(tmp_path, caplog):
    fake_checkpoint(tmp_path, identity=False)
    with caplog.at_level(logging.WARNING):
        folder = runfolder.prepare(cfg_of(tmp_path, "optim.lr=0.1"), resume=True)
    assert folder.resuming and folder.identity.startswith("unchecked")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot be checked" in warnings[0].getMessage()


def test_a_finished_run_asked_with_another_config_is_refused(tmp_path):
    cfg = cfg_of(tmp_path, "model.norm={name: bn, momentum: 0.01}")
    cfg.run = None
    run_dir = runfolder.run_dir_of(cfg)
    run_dir.mkdir(parents=True)
    done = RunResult(run_dir=str(run_dir), status="completed", steps=6, final={"val/acc": 0.5},
                     config=to_dict(load_config(None, [*TINY, f"trainer.log_dir={tmp_path}", "experiment=t",
                                                       "model.norm={name: bn, momentum: 0.01}"])))
    done.save(run_dir / "result.json")
    other = load_config(None, [*TINY, f"trainer.log_dir={tmp_path}", "experiment=t", f"run={run_dir.name}",
                               "model.norm={name: bn, momentum: 0.5}"])
    with pytest.raises(ConfigError, match=r"already finished \(completed, 6 steps\) with another config: "
                                          r"model.norm: .*0.01.* -> .*0.5"):
        train(other, resume=True)
    longer = load_config(None, [*TINY, f"trainer.log_dir={tmp_path}", "experiment=t", f"run={run_dir.name}",
                                "model.norm={name: bn, momentum: 0.01}", "trainer.max_steps=12"])
    with pytest.raises(ConfigError, match=r"trainer.max_steps: 6 -> 12"):
        train(longer, resume=True)
    same = load_config(None, [*TINY, f"trainer.log_dir={tmp_path}", "experiment=t",
                              "model.norm={name: bn, momentum: 0.01}", "trainer.progress=true"])
    assert train(same, resume=True).final == {"val/acc": 0.5}  # only a free key differs: the record comes back


def test_default_run_name_includes_norm_options():
    plain = load_config(None, TINY)
    assert runfolder.default_run_name(plain) == "resnet20-bn-lr0.003-bs16-s0"  # as before: old folders resume
    assert runfolder.default_run_name(load_config(None, [*TINY, "model.norm={name: bn}"])) == \
        "resnet20-bn-lr0.003-bs16-s0"
    a = runfolder.default_run_name(load_config(None, [*TINY, "model.norm={name: bn, momentum: 0.01}"]))
    b = runfolder.default_run_name(load_config(None, [*TINY, "model.norm={name: bn, momentum: 0.5}"]))
    assert a == "resnet20-bn_momentum=0.01-lr0.003-bs16-s0" and a != b
    long = runfolder.default_run_name(load_config(None, [*TINY, "model.norm={name: gn, num_groups: 2, eps: 0.001, "
                                                               "affine: false}"]))
    assert long.startswith("resnet20-gn_") and len(long) < 80


class _InterruptAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            monitor = next(c for c in trainer.callbacks if type(c).__name__ == "RunMonitor")
            monitor.stop_request.signum = signal.SIGINT


@pytest.mark.slow
def test_real_checkpoint_stores_identity_and_an_extended_resume_is_recorded(tmp_path):
    cut = train(cfg_of(tmp_path), callbacks=[_InterruptAt(4)])
    assert cut.status == "interrupted"
    ckpt = Path(cut.run_dir) / "last.ckpt"
    ident, step = runfolder.read_identity(ckpt)
    assert step == 4 and ident["torch_threads"] == torch.get_num_threads()
    assert runfolder.compare(ident["config"], to_dict(cfg_of(tmp_path))).refused == {}
    with pytest.raises(ConfigError, match=r"optim.lr: 0.003 -> 0.01"):
        train(cfg_of(tmp_path, "optim.lr=0.01"), resume=True)
    done = train(cfg_of(tmp_path, "trainer.max_steps=9", "trainer.log_every=1"), resume=True)
    assert done.status == "completed" and done.steps == 9
    (line,) = (Path(cut.run_dir) / runfolder.RESUMES).read_text().splitlines()
    rec = json.loads(line)
    assert rec["identity"] == "checked" and rec["step"] == 4
    assert rec["changed"] == {"trainer.max_steps": [6, 9], "trainer.log_every": [10, 1]}
    assert rec["threads"]["how"] == "restored" and rec["threads"]["now"] == torch.get_num_threads()


# ------------------------------------------------------------------------------------------ sweep threads
CALLS: list[tuple] = []


def fake_train(cfg, callbacks=None, resume=False):
    """A trainer_fn: seed 0's first call leaves a checkpoint and reports an interruption; the rest complete."""
    CALLS.append((cfg.trainer.threads, resume, torch.get_num_threads()))
    torch.set_num_threads(cfg.trainer.threads or 7)  # as train() does (7: a count restored from a checkpoint)
    run_dir = Path(cfg.trainer.log_dir) / cfg.experiment / cfg.run
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and cfg.seed == 0:
        (run_dir / "last.ckpt").write_bytes(b"checkpoint")
        return RunResult(run_dir=str(run_dir), status="interrupted", steps=1)
    return RunResult(run_dir=str(run_dir), status="completed", steps=2, final={"val/acc": 0.5}, config=to_dict(cfg))


def test_a_resumed_sweep_trial_restores_its_threads_not_the_workers_share(tmp_path):
    from normablate.sweep.runner import STOP, Sweep
    from normablate.sweep.spec import load_spec

    spec = load_spec({"kind": "grid", "study_name": "th", "log_dir": str(tmp_path / "logs"), "metric": "val/acc",
                      "base": {"model": {"backbone": "resnet20", "width": 4}, "trainer": {"max_steps": 2}},
                      "trainer_fn": "test_resume:fake_train", "grid": {"seed": [0, 1]}})
    url = f"sqlite:///{tmp_path / 'logs' / 'optuna.db'}"
    CALLS.clear()
    STOP.signum = None
    base = torch.get_num_threads()
    try:
        first = Sweep(spec, url, verbose=False, runtime={"trainer.threads": base + 1})  # a worker of --workers N
        first.setup(create=True)
        assert first.work(poll=0.1) == 130  # interrupted, re-queued
        again = Sweep(spec, url, verbose=False, runtime={"trainer.threads": base + 2})  # --workers changed
        again.setup(create=False)
        assert again.work(poll=0.1) == 0
    finally:
        torch.set_num_threads(base)
    # the retry leaves threads to the run's own record; every trial starts from the worker's own count, not the
    # count the trial before it set
    assert [c for c in CALLS if c[1]] == [(None, True, base)]
    assert len(CALLS) == 3 and all(c[2] == base for c in CALLS), CALLS


# ------------------------------------------------------------------------------------------ ranges
@pytest.mark.parametrize("override,message", [
    ("trainer.threads=0", r"trainer.threads=0 must be >= 1 \(allowed: 1 to 1024, or null\)"),
    ("trainer.threads=-1", r"trainer.threads=-1 must be >= 1"),
    ("seed=-1", r"seed=-1 must be >= 0 \(allowed: 0 to 4294967295\)"),
    ("seed=99999999999999999999", r"seed=99999999999999999999 must be <= 4294967295"),
    ("model.width=0", r"model.width=0 must be > 0 \(allowed: > 0 and <= 65536\)"),
    ("model.width=-3", r"model.width=-3 must be > 0"),
    ("model.width=100000000", r"model.width=100000000 must be <= 65536"),
    ("data.batch_size=0", r"data.batch_size=0 must be >= 1"),
    ("data.val_batch_size=100000000", r"data.val_batch_size=100000000 must be <= 16777216"),
    ("trainer.max_steps=10000000000", r"trainer.max_steps=10000000000 must be <= 1000000000"),
])
def test_ranges_name_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, override])


@pytest.mark.parametrize("override,message", [
    ("model.n_layer=0", r"model.n_layer=0 must be >= 1"),
    ("model.n_embd=1000000", r"model.n_embd=1000000 must be <= 65536"),
    ("data.block_size=1", r"data.block_size=1 must be >= 2"),
])
def test_lm_ranges(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.backbone=transformer_lm", override])


def test_a_bad_threads_value_creates_no_folder(tmp_path, capsys):
    assert main(["train", f"trainer.log_dir={tmp_path / 'logs'}", "trainer.threads=-1"]) == 2
    assert "trainer.threads=-1 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


# ------------------------------------------------------------------------------------------ memory
def test_parameter_count_on_meta_equals_the_real_model():
    from normablate import models

    for o in (["model.backbone=vgg11", "model.width=0.25"], ["model.backbone=vit", "model.depth=2"],
              ["model.backbone=transformer_lm", "model.n_layer=2"]):
        cfg = load_config(None, o)
        real = models.create(cfg.model.backbone, norm=cfg.model.norm, **cfg.model.options)
        assert footprint.estimate(cfg).params == sum(p.numel() for p in real.parameters())


def test_activation_estimate_equals_a_real_forward():
    """The meta-device forward counts what a real forward of the same batch produces (leaf outputs, each once)."""
    from normablate.data import build_datamodule
    from normablate.train import build_model

    cfg = load_config(None, [*TINY, "data.batch_size=4"])
    dm = build_datamodule(cfg.data, cfg.task, cfg.seed)
    dm.prepare_data()
    dm.setup("fit")
    fp = footprint.estimate(cfg, dm)
    net = build_model(cfg, dm)
    seen, total = {}, 0

    def hook(_m, _i, out):
        nonlocal total
        if id(out) not in seen:
            seen[id(out)] = out
            total += out.numel() * 4

    for m in net.modules():
        if not list(m.children()):
            m.register_forward_hook(hook)
    x, _ = dm.train_batch(step=0)
    net(x)
    assert fp.activation_bytes == total > 0
    assert fp.state_bytes == 4 * fp.params * 4  # AdamW: weights, grads, 2 moments, float32


def test_a_model_too_big_for_memory_is_refused_with_the_numbers(tmp_path, capsys, monkeypatch):
    rc = main(["train", f"trainer.log_dir={tmp_path / 'logs'}", "model.width=60000"])
    err = capsys.readouterr().err
    assert rc == 2 and "parameters" in err and "available" in err and "GB" in err
    assert not (tmp_path / "logs").exists()
    monkeypatch.setattr(footprint, "available_memory", lambda: (100_000, "test"))
    with pytest.raises(ConfigError, match=r"has 1\d,\d{3} parameters: .* but 98 KB is available \(test\)"):
        footprint.check_fits(load_config(None, TINY))


# ------------------------------------------------------------------------------------------ sweep preflight
@pytest.mark.parametrize("what", ["missing", "columns", "second source"])
def test_sweep_preflight_stops_a_bad_source_in_one_line(tmp_path, capsys, what):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    source = tmp_path / "nowhere" / "x.parquet"
    if what == "columns":
        source = tmp_path / "bad.parquet"
        pq.write_table(pa.table({"a": list(range(64)), "b": ["x"] * 64}), source)
    spec = {"kind": "grid", "study_name": "pf", "log_dir": str(tmp_path / "logs"), "metric": "val/acc",
            "base": {"model": {"backbone": "resnet20", "width": 4}, "data": {"source": str(source)},
                     "trainer": {"max_steps": 2, "val_every": 2}}, "grid": {"seed": [0, 1]}}
    if what == "second source":  # a grid over sources: each distinct data config is checked, not only the first
        spec["grid"] = {"data.source": ["synthetic", str(source)], "seed": [0]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    workers = ["--workers", "2"] if what == "columns" else []  # 2 workers: the preflight runs in a child process
    rc = main(["sweep", "-c", str(tmp_path / "s.yaml"), "--no-report", *workers])
    out = capsys.readouterr()
    assert rc == 2
    (line,) = [x for x in out.err.splitlines() if x.strip()]
    assert "preflight" in line and ("columns: a, b" if what == "columns" else "does not exist") in line
    assert "Traceback" not in out.err + out.out
    assert not any(p.is_dir() for p in (tmp_path / "logs" / "pf").glob("*"))  # no trial started a run folder

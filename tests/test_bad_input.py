"""Hardening (issue 7): every bad input is refused before any compute (exit 2, one line naming the key and what is
allowed, no traceback); names that become paths stay inside the log folder; corrupt or unwritable files end in
one clear line; plug-ins load from the CLI; TensorBoard shows what was swept."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normablate.cli import main
from support.helpers import free_port, run_main
from support.procs import kill_group, run_bounded
from support.runs import TINY

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ 1. bad input
@pytest.mark.parametrize("text,message", [
    ("model:\n  norm: [bn\noptim: {lr: 0.1}\n", r"cfg\.yaml:\d+:\d+: YAML syntax error"),
    ("", r"cfg\.yaml' is empty; give at least one key"),
    ("# only a comment\n", r"is empty"),
    ("- a\n- b\n", r"must hold a mapping"),
])
def test_bad_config_files_are_refused(tmp_path, capsys, text, message):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    code, _, err = run_main(capsys, "train", "--config", str(cfg), f"trainer.log_dir={tmp_path / 'logs'}")
    assert code == 2 and re.search(message, err), err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("overrides,message", [
    (["model.norm={name: bn, momentum: 2}"], r"norm 'bn' option momentum=2 is out of range; allowed: \[0, 1\]"),
    (["model.norm={name: noisy_bn, eps: -1}"], r"option eps=-1 is out of range"),
    (["model.norm={name: gn, num_groups: -2}"], r"num_groups=-2 must be >= 1"),
    (["model.norm={name: bn, affine: maybe}"], r"affine='maybe' must be true or false"),
    (["model.norm={name: bn, eps: .inf}"], r"must be a finite number"),
    (["optim.lr=inf"], r"optim.lr='inf' must be a finite number"),
    (["optim.lr=.nan"], r"optim.lr=nan must be a finite number"),
    (["model.width=.inf"], r"model.width=inf must be a finite number"),
    (["trainer.precision=half16"], r"trainer.precision='half16' is not allowed; valid \(Lightning\): 32-true, 16-mixed"),
    (["trainer.precision=16-mixed"], r"needs a GPU"),
])
def test_bad_values_are_refused_before_anything_is_built(tmp_path, capsys, overrides, message):
    code, _, err = run_main(capsys, "train", *TINY, f"trainer.log_dir={tmp_path}", *overrides)
    assert code == 2 and re.search(message, err), err
    assert len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


def test_norm_option_ranges_are_checked_for_every_registered_norm():
    """The range table is generic: any norm taking ``momentum``/``eps`` is checked, plug-ins add their own ranges."""
    from torch import nn

    import normablate as nb
    from normablate.errors import ConfigError
    from normablate.norms import Range

    for name in nb.norms.available():
        opts = nb.norms.options(name)
        for key, bad in (("momentum", 1.5), ("eps", -1), ("momentum", float("nan"))):
            if key in opts:  # the norm's own message, or the shared range table's
                with pytest.raises(ConfigError, match=rf"{key}"):
                    nb.norms.resolve({"name": name, key: bad}, "image")(8)

    class Scaled(nn.Module):
        option_ranges = {"scale": Range(0, 10, why="a gain")}

        def __init__(self, num_features, layout="image", scale=1.0):
            super().__init__()

    nb.norms.register("scaled_for_test", Scaled)
    try:
        with pytest.raises(ConfigError, match=r"scale=11 is out of range; allowed: \[0, 10\] \(a gain\)"):
            nb.norms.resolve({"name": "scaled_for_test", "scale": 11}, "image")(4)
        assert nb.norms.resolve({"name": "scaled_for_test", "scale": "1e-3"}, "image")(4) is not None  # YAML 1.1
    finally:
        nb.norms.REGISTRY.unregister("scaled_for_test")


def test_batch_larger_than_the_dataset_is_refused(tmp_path, capsys):
    code, _, err = run_main(capsys, "train", *TINY, f"trainer.log_dir={tmp_path}", "data.train_limit=20")
    assert code == 2 and "data.batch_size=32 is larger than the 20 training examples" in err, err
    assert not list(tmp_path.rglob("last.ckpt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_without_a_gpu_is_refused_before_data(tmp_path, capsys, monkeypatch):
    import normablate.data as data

    monkeypatch.setattr(data, "build_datamodule", lambda *a, **k: pytest.fail("data was loaded"))
    code, _, err = run_main(capsys, "train", *TINY, f"trainer.log_dir={tmp_path}", "trainer.accelerator=gpu")
    assert code == 2 and "trainer.accelerator='gpu' but this machine has no usable CUDA GPU" in err, err


@pytest.mark.parametrize("storage,message", [
    ("notascheme://x", r"unknown database scheme 'notascheme'"),
    ("journal:", r"a journal storage needs a file path"),
    ("justaname", r"neither a database URL nor a storage file"),
])
def test_malformed_storage_is_refused(tmp_path, capsys, storage, message):
    code, _, err = run_main(capsys, "sweep", "--config", str(ROOT / "configs/sweeps/quick.yaml"), "--storage", storage,
                         f"trainer.log_dir={tmp_path}")
    assert code == 2 and re.search(message, err), err
    assert len(err.strip().splitlines()) == 1, err


ALIAS_BOMB = "[&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
    f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 30)) + "]"  # 10**30 values once expanded


@pytest.mark.parametrize("argv,message", [  # issue 25's hostile inputs: refused at once, nothing created
    (["train", f"model.width={ALIAS_BOMB}", "--print-config"], r"aliases expand to more than"),
    (["sweep", "--config", str(ROOT / "configs/sweeps/quick.yaml"), "--workers", "100000", "--dry-run"],
     r"--workers 100000 is more than this machine can run at once: \d+ usable CPU core"),
    (["report", "--study", "nonexistent"], r"no study 'nonexistent': no database .*optuna\.db'?, so no studies there"),
    (["report", "--study", "x", "--storage", "journal:{tmp}/missing.log"], r"no journal .*missing\.log"),
    (["train", "trainer.threads=-1"], r"trainer.threads=-1 must be >= 1 \(allowed: 1 to 1024, or null\)"),
    (["train", "trainer.threads=0"], r"trainer.threads=0 must be >= 1"),
    (["train", "seed=-1"], r"seed=-1 must be >= 0"),
    (["train", "seed=99999999999999999999"], r"seed=99999999999999999999 must be <= 4294967295"),
    (["train", "model.width=-3"], r"model.width=-3 must be > 0"),
    (["train", "model.width=100000000"], r"model.width=100000000 must be <= 65536"),
    (["train", "model.width=60000"], r"has [\d,]+ parameters: .* GB is available"),  # the memory estimate
])
def test_hostile_inputs_of_issue_25_are_one_line_and_create_nothing(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, *(a.replace("{tmp}", str(tmp_path)) for a in argv))
    assert code == 2 and re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and "unexpected" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_unexpected_errors_are_one_line_unless_debugging(tmp_path, capsys, monkeypatch):
    import normablate.cli as cli

    def boom(args):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(cli, "cmd_list", boom)
    monkeypatch.delenv("NORMABLATE_DEBUG", raising=False)
    code, _, err = run_main(capsys, "list")
    assert code == 1 and "unexpected RuntimeError: something inside broke" in err and "NORMABLATE_DEBUG=1" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(RuntimeError, match="inside broke"):
        main(["--debug", "list"])
    monkeypatch.setenv("NORMABLATE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="inside broke"):
        main(["list"])


# ------------------------------------------------------------------------------------------ 2. paths
@pytest.mark.parametrize("override", ["experiment=../../x", "experiment=/tmp/abs_experiment", "experiment=a/../../x",
                                      "experiment=~/x", "experiment=''", "run=../x", "run=a/b", "run=..",
                                      "experiment=a\\b"])
def test_run_names_stay_inside_the_log_folder(tmp_path, capsys, override):
    logs = tmp_path / "a" / "logs"
    logs.parent.mkdir()
    code, _, err = run_main(capsys, "train", *TINY, f"trainer.log_dir={logs}", override)
    assert code == 2 and "stays inside the log folder" in err, err
    assert not logs.exists() and sorted(p.name for p in tmp_path.rglob("*")) == ["a"]
    assert not Path("/tmp/abs_experiment").exists()


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs_study", "a/./b", ".."])
def test_study_names_stay_inside_the_log_folder(tmp_path, capsys, name):
    logs = tmp_path / "logs"
    code, _, err = run_main(capsys, "sweep", "--config", str(ROOT / "configs/sweeps/quick.yaml"), "--study-name", name,
                         f"trainer.log_dir={logs}", "--check")
    assert code == 2 and "study name" in err and "stays inside the log folder" in err, err
    assert not any(tmp_path.iterdir())


def test_nested_experiment_names_are_allowed(tmp_path):
    from normablate.config import load_config

    assert load_config(None, ["experiment=claims/bn_vs_ln", "run=r1"]).experiment == "claims/bn_vs_ln"


# ------------------------------------------------------------------------------------------ 3. files
def test_truncated_checkpoint_with_resume_is_one_clear_line(tmp_path, capsys):
    assert main(["train", *TINY, f"trainer.log_dir={tmp_path}", "run=r"]) == 0
    run = tmp_path / "h" / "r"
    (run / "result.json").unlink()  # as if interrupted after its last checkpoint
    ckpt = run / "last.ckpt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    code, _, err = run_main(capsys, "train", *TINY, f"trainer.log_dir={tmp_path}", "run=r", "--resume")
    assert code == 2 and f"checkpoint '{ckpt}' is unreadable" in err and "Move it away" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert ckpt.stat().st_size == len(data) // 2  # left as it was


def test_unwritable_log_folder_is_one_clear_line(tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    code, _, err = run_main(capsys, "train", *TINY, f"trainer.log_dir={blocker / 'logs'}")
    assert code == 2 and "cannot write the run folder" in err and "trainer.log_dir" in err, err
    assert len(err.strip().splitlines()) == 1, err
    if os.geteuid() != 0:  # permission bits do not stop root
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, _, err = run_main(capsys, "train", *TINY, f"trainer.log_dir={ro}")
        assert code == 2 and "cannot write the run folder" in err and "Permission denied" in err, err


def test_run_folder_unwritable_mid_run_keeps_the_last_good_checkpoint(tmp_path):
    """At step 3 the run folder becomes unwritable (chmod where that binds; as root, where it does not, the
    checkpoint writer raises the PermissionError a read-only folder gives): the run stops with one RunFileError
    naming the file, and step 2's checkpoint is intact."""
    import lightning as L

    from normablate.config import load_config
    from normablate.errors import RunFileError
    from normablate.train import train

    class Lock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step != 3:
                return
            run = tmp_path / "h" / "r"
            if os.geteuid() != 0:
                run.chmod(0o500)
            else:
                def refuse(checkpoint, path, storage_options=None):
                    raise PermissionError(13, "Permission denied", str(path))

                trainer.strategy.checkpoint_io.save_checkpoint = refuse

    cfg = load_config(None, [*TINY, f"trainer.log_dir={tmp_path}", "run=r"])
    with pytest.raises(RunFileError, match=r"cannot write checkpoint '.*last.ckpt' at step 4: Permission denied; the "
                                           r"last good checkpoint .* is kept.*--resume"):
        train(cfg, callbacks=[Lock()])
    run = tmp_path / "h" / "r"
    run.chmod(0o755)
    assert torch.load(run / "last.ckpt", weights_only=False)["global_step"] == 2


def test_data_cache_byte_flip_is_detected_and_rebuilt(tmp_path):
    from normablate.data import cache

    built = []

    def build():
        built.append(1)
        return {"x": torch.arange(4096, dtype=torch.int64)}

    first = cache.cached("t", {"k": 1}, build, str(tmp_path))
    again = cache.cached("t", {"k": 1}, build, str(tmp_path))
    assert (first["_cache_hit"], again["_cache_hit"], len(built)) == (False, True, 1)
    path = Path(again["_cache_file"])
    data = bytearray(path.read_bytes())
    pos = bytes(data).index((1000).to_bytes(8, "little"))  # element 1000 of the tensor's storage
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))  # same size, one bit different
    assert torch.load(path, weights_only=True)["x"][1000] == 1001  # unchecked, it would load as garbage
    rebuilt = cache.cached("t", {"k": 1}, build, str(tmp_path))
    assert (rebuilt["_cache_hit"], len(built)) == (False, 2)
    assert torch.equal(rebuilt["x"], torch.arange(4096))
    assert cache.cached("t", {"k": 1}, build, str(tmp_path))["_cache_hit"]  # the rebuilt file verifies


def test_resume_without_a_checkpoint_says_it_starts_from_scratch(tmp_path, capsys):
    code, _, err = run_main(capsys, "train", *TINY, f"trainer.log_dir={tmp_path}", "run=r", "--resume")
    assert code == 0 and "--resume: no checkpoint in" in err and "starting this run from scratch" in err, err


# ------------------------------------------------------------------------------------------ 5. plug-ins
PLUGIN = '''
import torch
from torch import nn

import normablate as nb


@nb.norms.register("scale_only")
class ScaleOnly(nn.Module):
    def __init__(self, num_features, layout="image", init=1.0):
        super().__init__()
        self.layout = layout
        self.g = nn.Parameter(torch.full((num_features,), init))

    def forward(self, x, mask=None):
        return x * (self.g.view(1, -1, 1, 1) if self.layout == "image" else self.g)
'''


def cli(cwd: Path, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed ``normablate`` script (not ``python -m``, which would put the working directory on sys.path),
    with no PYTHONPATH."""
    exe = Path(sys.executable).parent / "normablate"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NORMABLATE_DEBUG")}
    return run_bounded([str(exe), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A user's working directory outside the package, holding the README's plug-in as my_norms.py."""
    (tmp_path / "my_norms.py").write_text(PLUGIN)
    return tmp_path


def test_plugin_norm_by_name_and_by_import_path_from_the_cli(workdir):
    r = cli(workdir, "train", "--plugin", "my_norms.py", *TINY, "trainer.log_dir=logs", "run=byname",
            "model.norm={name: scale_only, init: 0.5}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "plugins:\n- my_norms.py" in (workdir / "logs/h/byname/config.yaml").read_text()
    r = cli(workdir, "train", *TINY, "trainer.log_dir=logs", "run=bypath", "model.norm=my_norms:ScaleOnly")
    assert r.returncode == 0, r.stderr[-2000:]
    (workdir / "cfg.yaml").write_text("plugins: [my_norms]\nmodel: {norm: scale_only}\n")
    r = cli(workdir, "train", "--config", "cfg.yaml", *TINY, "trainer.log_dir=logs", "run=bykey")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli(workdir, "list", "--plugin", "my_norms.py")
    assert r.returncode == 0 and "scale_only" in r.stdout and "init" in r.stdout, r.stderr
    r = cli(workdir, "train", "--plugin", "nope.py", *TINY, "trainer.log_dir=logs")
    assert r.returncode == 2 and "plugin file 'nope.py' does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_sweep_workers_load_the_plugins(workdir):
    spec = workdir / "sweep.yaml"
    spec.write_text(
        "kind: grid\nstudy_name: plug\nbase:\n  experiment: plug\n"
        "overrides: {" + ", ".join(f"{k}: {v}" for k, v in (o.split("=", 1) for o in TINY if o.split("=")[0] not in
                                                            ("experiment",))) + "}\n"
        "grid:\n  model.norm: [scale_only, bn]\n  seed: [0]\n")
    r = cli(workdir, "sweep", "--config", "sweep.yaml", "--plugin", "my_norms.py", "--workers", "2", "--no-report",
            f"--storage=sqlite:///{workdir / 'o.db'}", "trainer.log_dir=logs")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    import optuna

    study = optuna.load_study(study_name="plug", storage=f"sqlite:///{workdir / 'o.db'}")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["config"]["model"]["norm"] for t in done) == ["bn", "scale_only"]
    assert all(t.user_attrs["config"]["plugins"] == ["my_norms.py"] for t in done)


# ------------------------------------------------------------------------------------------ 6. TensorBoard
def _post(port: int, route: str, body: dict) -> dict:
    import json
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/data/plugin/hparams/{route}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_tensorboard_hparams_show_what_was_swept(tmp_path):
    """Two runs differing in norm and LR, read back through the real TensorBoard server's hparams API."""
    import time
    import urllib.error

    for norm, lr in (("bn", "0.01"), ("ln", "0.05")):
        assert main(["train", *TINY, f"trainer.log_dir={tmp_path}", f"model.norm={norm}", f"optim.lr={lr}"]) == 0
    port = free_port()
    exe = Path(sys.executable).parent / "tensorboard"
    proc = subprocess.Popen([str(exe), "--logdir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline, exp = time.monotonic() + 120, {}
        while time.monotonic() < deadline:  # poll until the server is up and has read both runs
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                exp = _post(port, "experiment", {"experimentName": ""})
                if len(_post(port, "session_groups", {"experimentName": "", "startIndex": 0, "sliceSize": 10,
                                                      "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN"],
                                                      "colParams": []}).get("sessionGroups", [])) == 2:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        infos = {h["name"]: h for h in exp["hparamInfos"]}
        assert infos["model.norm"]["differs"] and infos["optim.lr"]["differs"]
        assert not infos["data.batch_size"]["differs"] and not infos["data.source"]["differs"]
        names = [h["name"] for h in exp["hparamInfos"]]  # what differs is listed first
        assert set(names[:3]) == {"model.norm", "optim.lr", "run"}, names[:5]
        metrics = {m["name"]["tag"] for m in exp["metricInfos"]}
        assert {"hp/val_acc", "hp/val_loss", "run/diverged"} <= metrics and "epoch" not in metrics
        groups = _post(port, "session_groups", {"experimentName": "", "startIndex": 0, "sliceSize": 10,
                                                "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN"],
                                                "colParams": []})["sessionGroups"]
        assert sorted(g["hparams"]["model.norm"] for g in groups) == ["bn", "ln"]
        for g in groups:
            steps = {m["name"]["tag"]: m["trainingStep"] for m in g["metricValues"]}
            values = {m["name"]["tag"]: m["value"] for m in g["metricValues"]}
            assert steps["hp/val_acc"] == steps["hp/val_loss"] == steps["run/diverged"], steps  # one evaluation's
            assert values["run/diverged"] == 0.0 and 0.0 <= values["hp/val_acc"] <= 1.0, values
    finally:
        kill_group(proc)
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ 7. CLI polish
def test_offline_hub_source_fails_at_once_with_a_hint(tmp_path, capsys, monkeypatch):
    """No network to the hub (an endpoint on a closed loopback port): one line with the way out, and the hub
    loader (which would retry for half a minute) is never called."""
    import socket

    import datasets

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub loader was called"))
    code, _, err = run_main(capsys, "train", *TINY, f"trainer.log_dir={tmp_path}", "data.source=some_user/some_set",
                         f"data.cache_dir={tmp_path / 'cache'}")
    assert code == 2 and "cannot be reached" in err and "point data.source at the local copy" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_resumed_run_says_where_it_resumes(tmp_path):
    """A resumed run prints 'resuming from step N' and its progress starts at N of max_steps; no Lightning 'Epoch 0'
    or 'Validation' bar is printed. (stdout is a pipe here: plain progress lines, not the terminal's bar.)"""
    args = [*TINY, f"trainer.log_dir={tmp_path}", "run=r", "trainer.progress=true"]
    first = cli(tmp_path, "train", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp_path / "h/r/result.json").unlink()
    again = cli(tmp_path, "train", *args, "trainer.max_steps=6", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from step 4 of 6" in again.stderr and "loading data: synthetic" in again.stderr
    both = first.stdout + first.stderr + again.stdout + again.stderr
    assert "r: step 6/6 (100%)" in both and "Epoch 0" not in both and "Validation" not in both
    assert "\r" not in again.stdout  # plain lines in a log, no carriage-return frames


def test_plain_run_named_like_a_sweep_does_not_block_the_sweep(tmp_path, capsys):
    """`train --config configs/runs/quick_synthetic.yaml` and then the quick sweep: shipped names do not collide, and
    a plain run in a study's folder is not taken for an earlier sweep."""
    import yaml as _yaml

    assert _yaml.safe_load((ROOT / "configs/runs/quick_synthetic.yaml").read_text())["experiment"] != \
        _yaml.safe_load((ROOT / "configs/sweeps/quick.yaml").read_text()).get("study_name", "quick")
    assert main(["train", *TINY, f"trainer.log_dir={tmp_path}", "experiment=quick", "run=plain"]) == 0
    code = main(["sweep", "--config", str(ROOT / "configs/sweeps/quick.yaml"), "--dry-run", "--study-name", "quick",
                 "--no-report", f"--storage=sqlite:///{tmp_path / 'o.db'}", f"trainer.log_dir={tmp_path}"])
    assert code == 0, capsys.readouterr().err

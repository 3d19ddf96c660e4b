"""``normablate bench`` runs and writes well-formed results (tiny sizes; no timing is asserted), BN folding
keeps eval outputs, the allocator settings apply, and the CLI answers --help/--version without heavy imports."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

import normablate as nb
from normablate import bench
from normablate.bench.sections import data as data_section
from normablate.bench.sections import models as models_section
from normablate.bench.sections import sweep as sweep_section
from normablate.fold import fold_batchnorm


def test_bench_tiny_writes_well_formed_results(tmp_path):
    md, csv_path = bench.run_bench(tmp_path, tiny=True, command="pytest tiny bench")
    rows = list(csv.DictReader(csv_path.open()))
    assert rows and set(rows[0]) == set(bench.FIELDS)
    sections = {r["section"] for r in rows}
    assert sections == set(bench.SECTIONS) - {"sweep"}  # the sweep section is opt-in (minutes): its own test
    measured = {(r["name"], r["layout"]) for r in rows if r["section"] == "norms" and r["variant"] == "eager"}
    for name in nb.norms.available():  # every registered norm, both layouts
        for layout in nb.norms.LAYOUTS:
            assert (name, layout) in measured
    for r in rows:
        if r["ratio"]:
            assert float(r["ratio"]) > 0
    fw = {r["name"]: r for r in rows if r["section"] == "framework"}
    assert {"resnet20", "transformer_lm"} <= set(fw)
    for r in fw.values():  # the hand loop reproduces the framework's losses
        assert "max |loss diff| 0.00e+00" in r["note"] or float(r["note"].split("diff| ")[1].split()[0]) < 1e-5
    models = [r for r in rows if r["section"] == "models"]  # every variant of the Transformer norm studies
    for study, n in (("vit_norms", 6), ("lm_norms", 7)):
        rs = [r for r in models if r["name"].startswith(study + ": ") and r["variant"] == "eager"]
        assert len(rs) == n and rs[0]["reference"] == rs[0]["ours"] and float(rs[0]["ratio"]) == 1.0
        assert all(r["reference"] == rs[0]["ours"] for r in rs)
    # labelled as the study's report labels them (analysis.tables.config_label)
    assert {r["ours"] for r in models} >= {"norm=ln ffn_norm=bn", "norm=dyt ffn_norm=None", "masked_bn"}
    text = md.read_text()
    assert "Run: `pytest tiny bench`" in text and "load average (1, 5, 15 min) before" in text
    assert "## norms" in text and "torch " in text and "## data" in text


def test_bench_models_flops_peak_and_auto_vs_eager():
    """Per study variant: step time vs the first variant, achieved GFLOP/s against a matmul peak measured in the
    same run, and auto vs eager (timed where auto differs: the CNN study; the Transformers' auto is eager)."""
    s = bench.Settings.make(tiny=True)
    s.model_studies = ("santurkar_vgg", "lm_norms")
    rows = models_section.run(s)
    by = {}
    for r in rows:
        by.setdefault(r.variant, []).append(r)
    assert len(by["eager"]) == 3 + 7 and len(by["GFLOP/s"]) == 3 + 7 + 1 and len(by["auto vs eager"]) == 3 + 7
    assert len(by["profile"]) == 2 and all("matmul" in r.note and "optimizer step" in r.note for r in by["profile"])
    assert next(r for r in rows if r.name == "matmul peak").ours_value > 0
    for r in by["GFLOP/s"][:-1]:
        assert r.ours_value > 0 and r.reference_value > 0 and r.ratio > 0 and "% of the matmul peak" in r.note
    lm = [r for r in by["GFLOP/s"] if r.name.startswith("lm_norms")]
    assert all("added by hand" in r.note for r in lm)  # CPU flash attention is not counted by FlopCounterMode
    cnn = [r for r in by["auto vs eager"] if r.name.startswith("santurkar_vgg")]
    assert all(r.ours == "auto (channels_last)" and r.ratio > 0 for r in cnn)
    assert all(r.ratio is None and "auto = eager" in r.note for r in by["auto vs eager"] if r.name.startswith("lm"))


def test_step_flops_adds_cpu_flash_attention_by_hand():
    B, h, T, d = 2, 3, 5, 4
    q, k, v = (torch.randn(B, h, T, d, requires_grad=True) for _ in range(3))

    def step():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    total, by_hand = models_section.step_flops(step)
    assert by_hand == 12 * B * h * T * T * d and total == by_hand


@pytest.mark.parametrize("backbone,kw", [("resnet20", {}), ("vgg11", {"width": 0.25}),
                                         ("resnet20", {"norm_position": "after_act"})])
def test_fold_batchnorm_keeps_eval_outputs(backbone, kw):
    model = nb.models.create(backbone, norm="bn", num_classes=10, **kw)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        for _ in range(3):
            model(x * 2 + 1)  # running statistics away from their init
    model.eval()
    folded, count = fold_batchnorm(model)
    bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    if kw.get("norm_position") == "after_act":
        assert count == 0 and bns > 0  # a BN after a ReLU does not follow a conv directly: nothing folded
    else:
        assert count > 0 and bns == 0
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-4)


def test_fold_leaves_noisy_bn_alone():
    model = nb.models.create("resnet20", norm="noisy_bn", num_classes=10, width=4).eval()
    folded, count = fold_batchnorm(model)
    assert count == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_allocator_thresholds_stop_page_faults_of_large_tensors():
    """Measured in a fresh process: in a long-lived one (a test worker after other tests), free chunks left in the
    heap can serve the 8 MB without any mmap, and the default side shows no faults."""
    script = """
import resource, torch
from normablate import alloc

def faults():
    torch.ones(2_000_000)  # settle the heap after a switch
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(2_000_000)  # 8 MB allocated, written and freed, as an activation each step
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

assert alloc.set_thresholds(alloc.GLIBC_DEFAULT, alloc.GLIBC_DEFAULT)
faults()  # after a switch glibc takes a few allocations to settle (measured: up to 4 of 5 still fault)
default = faults()
assert alloc.set_thresholds(alloc.MMAP_THRESHOLD, alloc.TRIM_THRESHOLD)
faults()
print(default, faults())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    default, tuned = map(int, proc.stdout.split())
    assert default > 5 * 1000  # ~2000 4-KiB pages per 8 MB mapping, faulted in again each time
    assert tuned < default / 2  # typically 0


def test_cli_help_and_version_import_no_heavy_library():
    code = ("import sys\nfrom normablate.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'timm', 'lightning', 'optuna', 'pandas', 'matplotlib') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"normablate {nb.__version__}" in out and "usage: normablate" in out
    assert "HEAVY []" in out


def test_bench_data_section_splits_step_time(tmp_path):
    """Data wait: per config, a hand-loop row (batch building vs model step) and a train() row, both positive."""
    _, csv_path = bench.run_bench(tmp_path, tiny=True, sections=["data"], command="pytest data")
    rows = [r for r in csv.DictReader(csv_path.open()) if r["section"] == "data"]
    assert {r["variant"] for r in rows} == {"hand loop", "train()"}
    assert {r["name"].split(" ")[0] for r in rows} == set(data_section.CIFAR_CONFIGS)
    for r in rows:
        assert float(r["ours_value"]) > 0 and float(r["reference_value"]) > 0
        share = float(r["note"].split("% of step time")[0].split()[-1])
        assert 0 < share < 100
        assert float(r["ratio"]) > 0


def test_bench_keeps_sections_it_did_not_run(tmp_path):
    """A run of some sections (--only) keeps the others from the previous files: rows, provenance, run time."""
    old = [bench.Row("norms", "bn", "image", "eager", "bn", "nn.BatchNorm2d", 1.5, 1.25, "ms", 1.2, "n"),
           bench.Row("startup", "normablate --help", "", "process", "whole process", "", 0.04, None, "s")]
    report = bench.Report(bench.Settings.make(tiny=True), "first command")
    report.settings.sections = ("norms", "startup")
    report.rows = old
    bench.write(report, tmp_path, {"norms": "Run: `first` norms", "startup": "Run: `first` startup"},
                {"norms": "3 s", "startup": "4 s"})
    new = bench.Report(bench.Settings.make(tiny=True), "second command")
    new.settings.sections = ("startup",)
    new.rows = [bench.Row("startup", "normablate --help", "", "process", "whole process", "", 0.5, None, "s")]
    md, csv_path = bench.write(new, tmp_path, {"startup": "Run: `second` startup"}, {"startup": "5 s"})
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["section"], r["ours_value"]) for r in rows] == [("norms", "1.5"), ("startup", "0.5")]
    assert rows[0]["ratio"] == "1.2" and rows[0]["note"] == "n"
    text = md.read_text()
    assert "Run: `first` norms" in text and "Run: `second` startup" in text and "Run: `first` startup" not in text
    assert "norms: 3 s" in text and "startup: 5 s" in text and "second command" in text
    assert "bn tokens" not in text and "under 1.5 s: 0.50 s" in text  # goals from all rows, the new ones
    # the kept section's table is the same text as before
    assert "| bn | image | eager | bn | nn.BatchNorm2d | 1.5 ms | 1.25 ms | **1.2×** | n |" in text
    assert bench.write(new, tmp_path, {}, {}, keep=False)[1].read_text().count("\n") == 2  # header + 1 row


@pytest.mark.slow
def test_bench_sweep_section_runs_the_quick_sweep_with_1_and_2_workers(tmp_path):
    """The quick sweep (tiny: 2 trials of 4 steps) through the real command with --workers 1 and 2: trials per
    hour for both, per-trial overhead consistent with its parts, every trial timed once."""
    _, csv_path = bench.run_bench(tmp_path, tiny=True, sections=["sweep"], command="pytest sweep")
    rows = {r["name"]: r for r in csv.DictReader(csv_path.open()) if r["section"] == "sweep"}
    head = next(r for name, r in rows.items() if name.startswith("quick sweep"))
    assert "(2 trials per run)" in head["name"], head["note"]  # (the note says why a run failed)
    assert "failed" not in head["note"] and float(head["ours_value"]) > 0 and float(head["reference_value"]) > 0
    assert float(head["ratio"]) > 0
    for w in (1, 2):
        r = rows[f"per-trial overhead, --workers {w}"]
        overhead, wall = float(r["ours_value"]), float(r["reference_value"])
        assert 0 < overhead < wall and "2 trials" in r["note"]
        assert "worker process start -> first trial" in rows[f"trial set-up, --workers {w}"]["note"]


def test_trial_times_decomposition():
    """Per-trial parts from timing records: wall = steps + overhead; first trial of each process vs later ones."""
    recs = [{"pid": 1, "process_start": 0.0, "call": 10.0, "end": 20.0, "first_step": 12.0, "last_step_end": 19.0,
             "steps": 5, "steps_time": 5.0, "val_time": 1.0, "between_time": 1.0},
            {"pid": 1, "process_start": 0.0, "call": 20.5, "end": 28.0, "first_step": 21.0, "last_step_end": 27.5,
             "steps": 5, "steps_time": 5.0, "val_time": 1.0, "between_time": 0.5},
            {"pid": 2, "process_start": 1.0, "call": 9.0, "end": 19.0, "first_step": 11.0, "last_step_end": 18.0,
             "steps": 5, "steps_time": 5.0, "val_time": 1.0, "between_time": 1.0}]
    parts = sweep_section._trial_rows(recs)
    assert parts["wall"] == [10.0, 7.5, 10.0] and parts["overhead"] == [5.0, 2.5, 5.0]
    assert parts["first_setup"] == [2.0, 2.0] and parts["later_setup"] == [0.5]
    assert parts["worker_start"] == [10.0, 8.0] and parts["after"] == [1.0, 0.5, 1.0]
    for i in range(3):
        assert abs(parts["setup"][i] + parts["steps"][i] + parts["val"][i] + parts["between"][i]
                   + parts["after"][i] - parts["wall"][i]) < 1e-9


def test_bench_norms_subset_keeps_the_other_norms_rows(tmp_path):
    """--norms NAME...: the norms section keeps the rows of the norms not measured, and says where they came from."""
    def report(cmd, names, rows):
        r = bench.Report(bench.Settings.make(tiny=True), cmd)
        r.settings.sections, r.settings.norms, r.rows = ("norms",), names, rows
        return r

    def row(name, v):
        return bench.Row("norms", name, "image", "eager", name, "ref", v, 1.0, "ms", v)

    bench.write(report("all", None, [row("bn", 1.0), row("ln", 2.0), row("rms", 3.0)]), tmp_path,
                {"norms": "Run: `all`"}, {"norms": "1 s"})
    bench.write(report("some", ("ln",), [row("ln", 4.0)]), tmp_path, {"norms": "Run: `some`"}, {"norms": "2 s"})
    md, csv_path = bench.write(report("more", ("rms",), [row("rms", 5.0)]), tmp_path, {"norms": "Run: `more`"},
                               {"norms": "3 s"})
    got = {r["name"]: r["ours_value"] for r in csv.DictReader(csv_path.open())}
    assert got == {"bn": "1", "ln": "4", "rms": "5"}
    text = md.read_text()
    assert "Run: `more`" in text and "Other norms' rows: Run: `some`" in text and "Other norms' rows: Run: `all`" in text
    assert text.count("Run: `all`") == 1


def test_timed_train_records_consistent_parts(tmp_path, monkeypatch):
    """The sweep section's trainer_fn: one record per call; steps, validation (inside and after the steps) and the
    time between steps are non-negative and fit inside the call's wall time; the run's result is returned."""
    import json

    times = tmp_path / "t.jsonl"
    monkeypatch.setenv(sweep_section.TRIAL_TIMES_ENV, str(times))
    cfg = {"model": {"backbone": "resnet20", "norm": "bn", "width": 4},
           "data": {"source": "synthetic", "batch_size": 8, "train_limit": 64, "val_limit": 16, "val_batch_size": 16},
           "trainer": {"max_steps": 4, "val_every": 2, "progress": False, "log_dir": str(tmp_path)},
           "experiment": "t", "run": "r"}
    result = sweep_section.timed_train(cfg)
    assert result.steps == 4
    (rec,) = [json.loads(line) for line in times.read_text().splitlines()]
    assert rec["steps"] == 4 and rec["val_time"] > 0 and rec["between_time"] >= 0 and rec["steps_time"] > 0
    parts = sweep_section._trial_rows([rec])
    assert parts["setup"][0] > 0 and parts["after"][0] >= -1e-3
    assert rec["steps_time"] + rec["val_time"] + rec["between_time"] <= rec["end"] - rec["call"]


def test_channel_stats_exact_from_uint8():
    """The per-run data set-up's channel statistics (bincount straight on uint8) equal float64 mean/std."""
    from normablate.data.vision import channel_stats

    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    x[0, 0] = 255  # the top bin is counted
    mean, std = channel_stats(x)
    xf = x.double() / 255
    torch.testing.assert_close(mean, xf.mean((0, 2, 3)).float())
    torch.testing.assert_close(std, xf.transpose(0, 1).reshape(3, -1).std(1, unbiased=False).float())


def test_cli_bench_only_choices_are_the_registered_sections():
    """``bench --only`` offers the section modules (found without importing them: ``--help`` imports no torch)."""
    from normablate.cli import build_parser

    parser = build_parser("bench")
    sub = next(a for a in parser._actions if a.dest == "command").choices["bench"]
    only = next(a for a in sub._actions if a.dest == "only")
    assert tuple(only.choices) == bench.SECTIONS
    assert bench.SECTIONS[:2] == ("norms", "allocator") and bench.SECTIONS[-1] == "sweep"  # the report's order


def test_rerender_keeps_the_committed_rows_header_and_tables(tmp_path):
    """``normablate.bench.report.rerender`` (after an edit of goals or notes) measures nothing: the committed CSV is
    written back byte for byte, the header's command and machine stay, every table line comes back unchanged, and a
    second re-render gives the same file (the provenance lines' markdown breaks no longer grow at each pass)."""
    import shutil
    from pathlib import Path

    from normablate.bench.report import rerender

    docs = Path(__file__).resolve().parents[2] / "docs"
    for name in ("benchmarks.md", "benchmarks.csv"):
        shutil.copy(docs / name, tmp_path / name)
    md = rerender(tmp_path)
    assert (tmp_path / "benchmarks.csv").read_bytes() == (docs / "benchmarks.csv").read_bytes()
    old, new = (docs / "benchmarks.md").read_text().splitlines(), md.read_text().splitlines()
    assert new[:4] == old[:4]  # title, Last command, Machine
    tables = [line for line in old if line.startswith("| ")]
    assert len(tables) > 100 and [line for line in new if line.startswith("| ")] == tables
    first = md.read_text()
    assert rerender(tmp_path).read_text() == first


def test_goal_reasons_and_dead_ends_are_read_from_the_notes():
    """The goals are data (bench/goals.py); their reasons and the dead ends are docs (docs/benchmark_notes.md),
    parsed into one line each: every reason a goal names exists, and issue 29's seeds-as-batch dead end is listed."""
    from normablate.bench import goals
    from normablate.bench.report import notes

    why, dead = notes()
    keys = {key for _, _, key in goals.STARTUP_GOALS if key} | {"rms tokens", "transformer peak"}
    assert keys <= set(why) and all(why[k] and "\n" not in why[k] for k in keys)
    assert any(k.startswith("lm_norms: ") for k in why)  # model-level reasons, keyed by the start of a row name
    seeds = [d for d in dead if d.startswith("Seeds as a batch dimension")]
    assert len(dead) >= 7 and len(seeds) == 1 and "1.24-1.35x" in seeds[0] and "1.05-1.21x" in seeds[0]
    rows = [bench.Row("startup", "normablate list", "", "process", ours_value=2.0, unit="s"),
            bench.Row("startup", "normablate --help", "", "process", ours_value=0.5, unit="s")]
    lines = bench.summary(rows)
    assert lines == [f"- `normablate list` under 1.5 s: 2.00 s — NOT met ({why['list']})",
                     "- `normablate --help` under 1.5 s: 0.50 s — met"]


def test_every_compared_row_states_its_ratio_interval(monkeypatch):
    """A bench ratio is a statistic over interleaved repeats: each compared row's note carries its 95% bootstrap CI
    (claim 8's 0.93x had none), after the row's own note; fewer than 3 repeats give no interval."""
    from normablate.bench import timing

    times = {"ours": [2.0, 2.2, 1.8, 2.0, 2.1], "ref": [1.0, 1.0, 1.0, 1.0, 1.0]}
    monkeypatch.setattr(timing, "interleaved", lambda fns, repeats: {k: times[k][:repeats] for k in fns})
    row = timing.compare("norms", "rms", "tokens", "a", "b", lambda: None, lambda: None, 5, note="claim: x")
    lo, hi = timing.ratio_ci(times["ours"], times["ref"])
    assert row.ratio == 2.0 and 1.8 <= lo <= 2.0 <= hi <= 2.2
    assert row.note == f"claim: x; ratio 95% CI [{lo:.3f}, {hi:.3f}]"
    assert timing.compare("norms", "rms", "tokens", "a", "b", lambda: None, lambda: None, 2).note == ""

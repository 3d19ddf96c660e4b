"""Section ``sweep`` (``--sweep`` or ``--only sweep``; minutes, so not run by default): trials per hour of the
README's quick sweep with ``--workers 1`` vs ``2`` (the real command, fresh temporary storage and log folder), and
each trial's time beyond its training steps (set-up, validation, between steps), first trial of a worker vs later
ones. ``timed_train`` is the sweep's ``trainer_fn``."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..harness import repo_file
from ..settings import Settings
from ..timing import Row, paired_ratio
from . import register

TEXT = ("The README's quick sweep (configs/sweeps/quick.yaml; the part of its grid and the overrides named in "
        "the Run line) run by the real command `normablate sweep --workers N --no-report` in fresh processes "
        "with a fresh log folder and storage in a temporary directory, --workers 1 and 2 interleaved (A B B A); "
        "as the command does, --workers 1 trains with torch's default threads (one per core) and --workers 2 "
        "with one thread per worker. Ratio = wall time of workers 2 / workers 1 (< 1 = more trials per hour). "
        "Per trial (trainer_fn timed inside the workers): overhead = trial wall time (train() call to return) "
        "- time in training steps.")


def sizes(s: Settings) -> str:
    return (f"grid seed {list(s.sweep_seeds)}"
            + (f" x optim.lr {list(s.sweep_lrs)}" if s.sweep_lrs is not None else " x the spec's lrs")
            + (f" x model.norm {list(s.sweep_norms)}" if s.sweep_norms is not None else " x the spec's norms")
            + f", {s.sweep_rounds} run(s) per side"
            + (", overrides " + " ".join(s.sweep_overrides) if s.sweep_overrides else ""))


QUICK_SWEEP = ("configs", "sweeps", "quick.yaml")
TRIAL_TIMES_ENV = "NORMABLATE_BENCH_TRIAL_TIMES"


def _process_start() -> float | None:
    """Wall-clock time (epoch seconds) this process started, from /proc (Linux); None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def timed_train(cfg, callbacks: list | None = None, resume: bool = False):
    """A sweep ``trainer_fn`` for the bench: ``train()`` plus one JSON line per trial appended to the file named by
    ``$NORMABLATE_BENCH_TRIAL_TIMES``: process id and start, call and return times, and the seconds spent in
    training steps, in validation and between steps."""
    import json

    import lightning as L

    from ...train import train

    call = time.time()

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.steps = self.val = self.between = 0.0
            self.n = 0
            self.first = self.last_end = None
            self.end_perf = None  # perf_counter at the last step's end
            self.val_since_end = 0.0  # validation time since then

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()
            if self.first is None:
                self.first = time.time()
            if self.end_perf is not None:  # fetch + build of this batch and the loop's bookkeeping
                self.between += self.t0 - self.end_perf - self.val_since_end

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.end_perf = time.perf_counter()
            self.val_since_end = 0.0
            self.steps += self.end_perf - self.t0
            self.n += 1
            self.last_end = time.time()

        def on_validation_start(self, trainer, pl_module):
            self.v0 = time.perf_counter()

        def on_validation_end(self, trainer, pl_module):
            dt = time.perf_counter() - self.v0
            self.val += dt
            self.val_since_end += dt

    timer = Timer()
    result = train(cfg, callbacks=[*(callbacks or []), timer], resume=resume)
    rec = {"pid": os.getpid(), "process_start": _process_start(), "call": call, "end": time.time(),
           "first_step": timer.first, "last_step_end": timer.last_end, "steps": timer.n,
           "steps_time": timer.steps, "val_time": timer.val, "between_time": timer.between}
    path = os.environ.get(TRIAL_TIMES_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return result


def sweep_spec(s: Settings, workers: int, rnd: int, tmp: Path) -> Path:
    """The README's quick sweep (configs/sweeps/quick.yaml) as a spec file under ``tmp``: its own log folder and
    storage there, the timing ``trainer_fn``, seeds ``s.sweep_seeds`` (tiny: one norm and 2 learning rates)."""
    import yaml

    from ...config import load_yaml

    src = repo_file(*QUICK_SWEEP)
    raw = load_yaml(src)
    raw["base"] = str((src.parent / raw["base"]).resolve())
    raw["grid"]["seed"] = list(s.sweep_seeds)
    if s.sweep_lrs is not None:
        raw["grid"]["optim.lr"] = list(s.sweep_lrs)
    if s.sweep_norms is not None:
        raw["grid"]["model.norm"] = list(s.sweep_norms)
    raw.pop("hypotheses", None)  # timing trials, not judging them (a tiny grid leaves a contrast side without runs)
    raw["trainer_fn"] = "normablate.bench.sections.sweep:timed_train"
    raw["study_name"] = f"bench-w{workers}-r{rnd}"
    raw["log_dir"] = str(tmp / "logs")
    path = tmp / f"w{workers}-r{rnd}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _trial_rows(records: list[dict]) -> dict[str, list[float]]:
    """Per-trial seconds: wall (trainer_fn call to return), steps, overhead (wall - steps) and its parts; and per
    worker process: start -> first trial (imports, paid once)."""
    out: dict[str, list[float]] = {k: [] for k in ("wall", "steps", "overhead", "setup", "val", "between", "after",
                                                   "first_setup", "later_setup", "worker_start")}
    by_pid: dict[int, list[dict]] = {}
    for r in records:
        by_pid.setdefault(r["pid"], []).append(r)
    for recs in by_pid.values():
        recs.sort(key=lambda r: r["call"])
        if recs[0]["process_start"] is not None:
            out["worker_start"].append(recs[0]["call"] - recs[0]["process_start"])
        for i, r in enumerate(recs):
            wall = r["end"] - r["call"]
            setup = (r["first_step"] or r["end"]) - r["call"]
            out["wall"].append(wall)
            out["steps"].append(r["steps_time"])
            out["overhead"].append(wall - r["steps_time"])
            out["setup"].append(setup)
            out["val"].append(r["val_time"])
            out["between"].append(r["between_time"])
            # the rest: after the last step and its validation (result, TensorBoard, files) and timer slack
            out["after"].append(wall - setup - r["steps_time"] - r["val_time"] - r["between_time"])
            out["first_setup" if i == 0 else "later_setup"].append(setup)
    return out


@register("sweep", text=TEXT, sizes=sizes, default=False)
def run(s: Settings) -> list[Row]:
    """Trials per hour of the quick sweep with ``--workers 1`` and ``--workers 2`` (the real CLI, in fresh
    processes, fresh storage and log folder in a temporary directory), interleaved A B B A ..., and where a
    trial's time goes beyond its training steps."""
    import json

    src = repo_file(*QUICK_SWEEP)
    if not src.is_file():
        return [Row("sweep", "quick sweep", note=f"not run: {src} not found (a source checkout is needed)")]
    order = []
    for r in range(s.sweep_rounds):  # A B B A: a slow drift of the load hits both sides alike
        order += [(1, r), (2, r)] if r % 2 == 0 else [(2, r), (1, r)]
    walls: dict[int, list[float]] = {1: [], 2: []}
    trials: dict[int, list[int]] = {1: [], 2: []}
    outside: dict[int, list[float]] = {1: [], 2: []}
    records: dict[int, list[dict]] = {1: [], 2: []}
    failures = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for workers, rnd in order:
            spec = sweep_spec(s, workers, rnd, tmp)
            times = tmp / f"times-w{workers}-r{rnd}.jsonl"
            env = {**os.environ, TRIAL_TIMES_ENV: str(times)}
            argv = [sys.executable, "-m", "normablate", "sweep", "--config", str(spec), "--workers", str(workers),
                    "--no-report", *s.sweep_overrides]
            print(f"bench: sweep --workers {workers} (round {rnd + 1}/{s.sweep_rounds}) ...", file=sys.stderr,
                  flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, cwd=tmp)
            wall = time.perf_counter() - t0
            recs = [json.loads(line) for line in times.read_text().splitlines()] if times.exists() else []
            if proc.returncode != 0 or not recs:
                failures.append(f"--workers {workers}: exit {proc.returncode}: "
                                + (proc.stderr.strip().splitlines() or ["no output"])[-1][:200])
                continue
            walls[workers].append(wall)
            busy: dict[int, float] = {}
            for r in recs:
                busy[r["pid"]] = busy.get(r["pid"], 0.0) + r["end"] - r["call"]
            outside[workers].append(wall - max(busy.values()))  # start, imports, storage: the busiest worker idle
            trials[workers].append(len(recs))
            records[workers] += recs
    if failures:
        return [Row("sweep", "quick sweep", note="failed: " + "; ".join(failures))]
    n = trials[1][0]
    per_h = {w: [t / x * 3600 for t, x in zip(trials[w], walls[w], strict=True)] for w in (1, 2)}
    tph1, tph2 = statistics.median(per_h[1]), statistics.median(per_h[2])
    rows = [Row("sweep", f"quick sweep ({n} trials per run)", "", "trials/hour", "--workers 2", "--workers 1", tph2,
                tph1, "trials/h", paired_ratio(walls[2], walls[1]),
                note=f"speed-up {tph2 / tph1:.2f}x; whole command (spawn, imports, storage, trials), no report; "
                     f"{len(walls[1])} run(s) per side, wall {statistics.median(walls[1]):.0f} s (workers 1) vs "
                     f"{statistics.median(walls[2]):.0f} s (workers 2), of which outside any trial (start, imports, "
                     f"storage; busiest worker) {statistics.median(outside[1]):.1f} s vs "
                     f"{statistics.median(outside[2]):.1f} s")]
    for w in (1, 2):
        parts = _trial_rows(records[w])
        med = {k: statistics.median(v) if v else None for k, v in parts.items()}
        share = sum(parts["overhead"]) / sum(parts["wall"])
        rows.append(Row("sweep", f"per-trial overhead, --workers {w}", "", "per trial", "trial wall - steps time",
                        "trial wall", med["overhead"], med["wall"], "s", None,
                        note=f"{share:.1%} of trial time; medians: set-up (call -> first step) {med['setup']:.2f} s, "
                             f"validation {med['val']:.2f} s, between steps (batches, loop) {med['between']:.2f} s, "
                             f"the rest (after the last step: result, files) {med['after']:.2f} s; steps "
                             f"{med['steps']:.2f} s; {len(parts['wall'])} trials"))
        later = med["later_setup"]
        rows.append(Row("sweep", f"trial set-up, --workers {w}", "", "per trial", "later trials of a worker",
                        "first trial of a worker", later, med["first_setup"], "s",
                        later / med["first_setup"] if later and med["first_setup"] else None,
                        note=f"worker process start -> first trial (imports, once per worker): "
                             f"{med['worker_start']:.2f} s" if med["worker_start"] is not None else ""))
    return rows

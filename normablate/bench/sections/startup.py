"""Section ``startup``: ``normablate --help`` / ``--version`` / ``list`` (repeated runs), process start to the first
training step, and the cost of a second run in the same process (what a sweep worker pays per trial)."""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time

from ..harness import framework_config
from ..settings import Settings
from ..timing import Row
from . import register

TEXT = ("Wall time of whole processes and of the first training step after process start, each command once per "
        "round, rounds repeated (interleaved); ratios are medians of per-round ratios. The floors: `normablate list` "
        "imports torch and nothing heavier; a run imports Lightning, whose Trainer imports torch._dynamo and "
        "torchmetrics (with torchvision and matplotlib): the reference of the first-step row.")


def sizes(s: Settings) -> str:
    return (f"{s.startup_runs} runs per command")


def _timed_process(argv: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False)
        out.append(time.perf_counter() - t0)
    return out


_FIRST_STEP = """
import sys, time, json
t_start = float(sys.argv[1])
import lightning as L
from normablate.train import train
cfg = json.loads(sys.argv[2])
class First(L.Callback):
    def on_train_batch_start(self, *a):
        if not hasattr(self, "t"):
            self.t = time.time() - t_start
first = First()
t1 = time.perf_counter(); train(cfg, callbacks=[first]); t2 = time.perf_counter()
first2 = First(); cfg["run"] = cfg["run"] + "-again"
t_second = time.time(); train(cfg, callbacks=[first2])
print(json.dumps({"first_step": first.t, "second_first_step": first2.t - (t_second - t_start)}))
"""


FLOOR = "import torch, lightning.pytorch"
# the floor timed as the first step is: from before the spawn to the end of the imports (not to the process's exit)
_FLOOR_PROBE = f"import sys, time\nt_start = float(sys.argv[1])\n{FLOOR}\nprint(time.time() - t_start)"


@register("startup", text=TEXT, sizes=sizes)
def run(s: Settings) -> list[Row]:
    """Every command once per round, rounds repeated (interleaved, so load drifts hit all alike); ratios are
    medians of per-round ratios."""
    import json

    exe = [sys.executable, "-m", "normablate"]
    cmds = {"python": [sys.executable, "-c", "pass"], "torch": [sys.executable, "-c", "import torch"]}
    names = ["--version"] if s.tiny else ["--help", "--version", "list"]
    cmds.update({f"normablate {a}": exe + [a] for a in names})
    times: dict[str, list[float]] = {k: [] for k in cmds}
    first: list[float] = []
    second: list[float] = []
    floor: list[float] = []  # the floor of the rounds whose first-step process succeeded
    failed = ""
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(s.startup_runs):
            for k, argv in cmds.items():
                times[k] += _timed_process(argv, 1)
            if s.tiny:
                continue
            probe = subprocess.run([sys.executable, "-c", _FLOOR_PROBE, repr(time.time())], capture_output=True,
                                   text=True, check=False)
            cfg = framework_config("resnet20", s, tmp, tiny=True)
            cfg["trainer"]["max_steps"] = 2
            cfg["run"] = f"startup-{i}"
            proc = subprocess.run([sys.executable, "-c", _FIRST_STEP, repr(time.time()), json.dumps(cfg)],
                                  capture_output=True, text=True, check=False)
            try:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                t_floor = float(probe.stdout.strip().splitlines()[-1])
                first.append(res["first_step"])
                second.append(res["second_first_step"])
                floor.append(t_floor)
            except (IndexError, ValueError, KeyError):
                failed = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: list[float], b: list[float]) -> float:
        return statistics.median(x / y for x, y in zip(a, b, strict=True))

    rows = [Row("startup", name, "", "process", "whole process", "python -c 'import torch'", med[name], med["torch"],
                "s", ratio(times[name], times["torch"]),
                note=f"min {min(times[name]):.2f} s, max {max(times[name]):.2f} s over {len(times[name])} runs; bare "
                     f"python {med['python']:.2f} s")
            for name in cmds if name.startswith("normablate")]
    if s.tiny:
        return rows
    if first:
        rows.append(Row("startup", "import torch + Lightning (the floor of a run)", "", "process", FLOOR, "",
                        statistics.median(floor), None, "s",
                        note="from before the spawn to the end of the imports (as the first-step row counts); "
                             "Lightning's Trainer imports torch._dynamo (lightning/pytorch/utilities/compile.py) and "
                             "torchmetrics, which imports torchvision and matplotlib: python -X importtime -c "
                             "'import lightning.pytorch'"))
        rows.append(Row("startup", "process start -> first training step", "", "process", "train()", FLOOR,
                        statistics.median(first), statistics.median(floor), "s", ratio(first, floor),
                        note=f"tiny ResNet-20, synthetic data; min {min(first):.2f} s, max {max(first):.2f} s over "
                             f"{len(first)} runs; over the floor: what normablate adds (its imports, config, data, "
                             f"model, Trainer set-up)"))
        rows.append(Row("startup", "second run in the same process -> first step", "", "in-process",
                        "train() again", "", statistics.median(second), None, "s",
                        note="what a sweep worker pays per trial after the first"))
    else:
        rows.append(Row("startup", "process start -> first training step", note=f"failed: {failed}"))
    return rows

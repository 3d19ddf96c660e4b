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

TEXT = "Wall time of whole processes (repeated) and of the first training step after process start."


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


@register("startup", text=TEXT, sizes=sizes)
def run(s: Settings) -> list[Row]:
    import json

    exe = [sys.executable, "-m", "normablate"]
    rows = []
    base = _timed_process([sys.executable, "-c", "pass"], s.startup_runs)
    torch_t = _timed_process([sys.executable, "-c", "import torch"], s.startup_runs)
    for args in ([["--version"]] if s.tiny else (["--help"], ["--version"], ["list"])):
        t = _timed_process(exe + args, s.startup_runs)
        rows.append(Row("startup", "normablate " + " ".join(args), "", "process", "whole process",
                        "python -c 'import torch'", statistics.median(t), statistics.median(torch_t), "s",
                        statistics.median(t) / statistics.median(torch_t),
                        note=f"min {min(t):.2f} s, max {max(t):.2f} s over {len(t)} runs; bare python "
                             f"{statistics.median(base):.2f} s"))
    if s.tiny:
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        cfg = framework_config("resnet20", s, tmp, tiny=True)
        cfg["trainer"]["max_steps"] = 2
        cfg["run"] = "startup"
        proc = subprocess.run([sys.executable, "-c", _FIRST_STEP, repr(time.time()), json.dumps(cfg)],
                              capture_output=True, text=True, check=False)
        try:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(Row("startup", "process start -> first training step", "", "process", "train()", "",
                            res["first_step"], None, "s", note="tiny ResNet-20, data cache warm"))
            rows.append(Row("startup", "second run in the same process -> first step", "", "in-process",
                            "train() again", "", res["second_first_step"], None, "s",
                            note="what a sweep worker pays per trial after the first"))
        except (IndexError, ValueError, KeyError):
            rows.append(Row("startup", "process start -> first training step", note="failed: "
                            + (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]))
    return rows

"""The main process of ``normablate sweep --workers N`` only validates the spec, sets up the storage and supervises
its workers: up to spawning them it must not import Lightning (or torchmetrics/torchvision, which Lightning pulls
in), which only the workers need to train. It does import torch: validating every trial's config builds its model
on the meta device (``config.validate``), and the hardware check asks ``torch.cuda``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, sys
from normablate.sweep import runner, load_spec

seen = {}

def fake_run_workers(spec, sweep, runtime, workers, max_restarts=None, target=None):
    seen["modules"] = sorted(m for m in ("lightning", "torchmetrics", "torchvision", "torch") if m in sys.modules)
    seen["workers"] = workers
    return 0

runner.run_workers = fake_run_workers
spec = load_spec(sys.argv[1], overrides=[f"trainer.log_dir={sys.argv[2]}"])
assert spec.trainer_fn == "normablate.train:train", spec.trainer_fn  # the real trainer (only named, never imported)
res = runner.run_sweep(spec, workers=2, verbose=False)
seen["total"] = res.counts.total
print("RESULT " + json.dumps(seen))
"""


def test_sweep_main_process_does_not_import_lightning(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "configs" / "sweeps" / "quick.yaml"),
                          str(tmp_path / "logs")], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert seen["workers"] == 2 and seen["total"] == 18  # quick.yaml: 3 seeds x 3 LRs x 2 norms
    assert seen["modules"] == ["torch"], seen  # torch: config validation; no Lightning, torchmetrics, torchvision

"""What start-up imports (issue 29): ``normablate list`` and the check of a ResNet config import no timm, torchvision
or torch._dynamo (nor Lightning, which pulls in the last two through torchmetrics and its Trainer); importing the
training code imports no timm. A test of what is imported (``sys.modules`` in a fresh interpreter), not of time:
``normablate bench --only startup`` measures the time."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("timm", "torchvision", "torch._dynamo", "lightning", "torchmetrics")


def _imported_after(code: str) -> list[str]:
    """The HEAVY modules in ``sys.modules`` of a fresh interpreter after ``code`` (own process group, killed if it
    outlives its bound)."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    proc = subprocess.Popen([sys.executable, "-c", probe], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"timed out: {code}")
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_list_imports_nothing_heavy():
    code = ("import contextlib, io\nfrom normablate.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n    assert main(['list']) == 0\n"
            "assert 'backbones:' in out.getvalue()")
    assert _imported_after(code) == []


def test_resnet_config_check_imports_nothing_heavy():
    code = ("from normablate.config import load_config\n"
            "cfg = load_config('configs/runs/resnet20_cifar10.yaml', ['model.norm=gn'])\n"
            "assert cfg.model.backbone == 'resnet20'")
    assert _imported_after(code) == []


def test_training_code_imports_no_timm():
    """Lightning (torchmetrics, torchvision, torch._dynamo) is the floor of a run; timm comes only with a timm
    model (vit, timm/<name>), built in models/vit.py and models/timm_zoo.py on first use."""
    assert "timm" not in _imported_after("import normablate.train\nimport normablate.build")

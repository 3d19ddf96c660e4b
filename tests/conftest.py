from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

if os.environ.get("PYTEST_XDIST_WORKER"):  # two test processes share the cores: one thread each (and their
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses), not two each fighting over two cores
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort), so that under pytest-xdist the long ones start early and the short ones
    fill the gaps, instead of one long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_stop_left():
    """The sweep's process-wide stop flag starts and ends each test unset (a test that stops a sweep in this process
    leaves it set, and the next one's workers would stop at once)."""
    from normablate.signals import STOP

    STOP.signum = None
    yield
    STOP.signum = None


@pytest.fixture
def shared_data() -> Path:
    """../shared/data; tests that need it skip only when ../shared is absent (CI always has it)."""
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # (dataclasses in a script look their module up there)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def load_script():
    """load_script(name): scripts/<name>.py imported as a module (the scripts are not a package)."""
    return _load_script

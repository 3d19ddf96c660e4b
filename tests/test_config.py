"""Every shipped sweep and study spec passes ``normablate sweep --check`` (each trial config validated)."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from normablate.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted([*(ROOT / "configs" / "sweeps").glob("*.yaml"), *(ROOT / "configs" / "studies").rglob("*.yaml")])


def test_the_readme_main_job_is_shipped():
    assert ROOT / "configs" / "sweeps" / "quick.yaml" in SPECS
    readme = (ROOT / "README.md").read_text()
    assert "normablate sweep --config configs/sweeps/quick.yaml --workers 2" in readme


@pytest.mark.parametrize("path", SPECS, ids=[str(p.relative_to(ROOT / "configs")) for p in SPECS])
def test_shipped_spec_passes_check(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # specs name data relative to the repository root, as the README runs them
    # --check needs neither the data nor the network (hub sources such as the GPU WikiText-103 spec included)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(OSError("network refused")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["sweep", "--config", str(path), "--check"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert " run configs valid" in out and "trials;" in out


def test_unquoted_off_reads_as_off_and_on_gets_a_hint():
    """YAML 1.1 reads an unquoted off/no as false, on/yes as true: a Literal key that lists "off" takes false as
    "off"; true (no "on" in the list) is refused with a hint to quote the word."""
    from normablate.config import load_config
    from normablate.errors import ConfigError

    assert load_config(None, ["trainer.batchstat_gap=off"]).trainer.batchstat_gap == "off"
    assert load_config(None, ["trainer.batchstat_gap='off'"]).trainer.batchstat_gap == "off"
    with pytest.raises(ConfigError, match=r"batchstat_gap=True is not allowed; valid: every, final, off \(YAML reads"):
        load_config(None, ["trainer.batchstat_gap=on"])

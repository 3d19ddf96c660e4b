"""The committed study reports regenerate byte for byte from the committed storage (docs/findings/studies.journal):
tables (CSV) and summary.md, but for its "written" timestamp line. A refactor that changes what a report says
fails here; a deliberate change regenerates the reports (``normablate report --study S --storage
journal:docs/findings/studies.journal --out docs/findings/S``) in the same commit."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FINDINGS = ROOT / "docs" / "findings"
STORAGE = FINDINGS / "studies.journal"


def _text(p: Path) -> str:
    t = p.read_text()
    return "\n".join(ln for ln in t.splitlines() if not ln.startswith("- written ")) if p.name == "summary.md" else t


@pytest.mark.slow
@pytest.mark.parametrize("study", ["bn_affine", "batch_size_gn_lr_check", "lm_dyt_lr_check"])
def test_committed_report_regenerates_identically(tmp_path, monkeypatch, study):
    from normablate.report import write_report

    monkeypatch.chdir(ROOT)  # the committed reports name the storage by its path from the repository root
    out = write_report(study, storage=f"journal:{STORAGE.relative_to(ROOT)}", out_dir=tmp_path / study)
    written = sorted(p.name for p in out.iterdir() if p.suffix in (".csv", ".md"))
    assert "summary.md" in written and "trials.csv" in written
    for name in written:
        assert _text(out / name) == _text(FINDINGS / study / name), f"{study}/{name} differs from the committed one"

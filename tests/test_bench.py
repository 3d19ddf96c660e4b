"""``normablate bench`` runs and writes well-formed results (tiny sizes; no timing is asserted), BN folding
keeps eval outputs, the allocator settings apply, and the CLI answers --help/--version without heavy imports."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

import normablate as nb
from normablate import alloc, bench
from normablate.fold import fold_batchnorm


def test_bench_tiny_writes_well_formed_results(tmp_path):
    md, csv_path = bench.run_bench(tmp_path, tiny=True, command="pytest tiny bench")
    rows = list(csv.DictReader(csv_path.open()))
    assert rows and set(rows[0]) == set(bench.FIELDS)
    sections = {r["section"] for r in rows}
    assert sections == set(bench.SECTIONS)
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
    text = md.read_text()
    assert "pytest tiny bench" in text and "Load average" in text and "## norms" in text and "torch " in text


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
    import resource

    def faults() -> int:
        torch.ones(2_000_000)  # settle the heap after a switch
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.ones(2_000_000)  # 8 MB allocated, written and freed, as an activation each step
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    try:
        assert alloc.set_thresholds(alloc.GLIBC_DEFAULT, alloc.GLIBC_DEFAULT)
        default = faults()
        assert alloc.set_thresholds(alloc.MMAP_THRESHOLD, alloc.TRIM_THRESHOLD)
        tuned = faults()
    finally:
        alloc.set_thresholds(alloc.MMAP_THRESHOLD, alloc.TRIM_THRESHOLD)
    assert default > 5 * 1000  # ~2000 4-KiB pages per 8 MB mapping, faulted in again each time
    assert tuned < default / 2  # typically 0; one re-fault of a block when other tests fragmented the heap


def test_cli_help_and_version_import_no_heavy_library():
    code = ("import sys\nfrom normablate.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'timm', 'lightning', 'optuna', 'pandas', 'matplotlib') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"normablate {nb.__version__}" in out and "usage: normablate" in out
    assert "HEAVY []" in out

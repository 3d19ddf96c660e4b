"""Usage: python scripts/time_main_job.py [--workers 2] [extra sweep args...]

Times the README's main job, ``normablate sweep --config configs/sweeps/quick.yaml --workers 2``, from process start
to exit (its report included), exactly as a user runs it after install: a fresh temporary working folder (its own
log folder and study storage), nothing cached but the embedded data set's decode. Prints one line with the wall
time, the CPU time of the command and its workers, the load average before and after (the 1-minute value should be
near 0 for "2 free cores"; other work on the machine makes the number larger), the CPU model and core count, and
the command's last output line (its answer). Exit status: the command's.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    args = argv or ["--workers", "2"]
    if "--workers" not in args:
        args = ["--workers", "2", *args]
    spec = ROOT / "configs" / "sweeps" / "quick.yaml"
    cmd = [sys.executable, "-m", "normablate", "sweep", "--config", str(spec), *args]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.lower().startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="normablate-main-job-") as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    last = (proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    print(f"main job ({' '.join(['normablate sweep --config configs/sweeps/quick.yaml', *args])}): "
          f"wall {wall:.0f} s ({wall / 60:.1f} min), CPU {child.ru_utime + child.ru_stime:.0f} s; load average "
          f"before {load_before}, after {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {cpu}, "
          f"{os.cpu_count()} cores; exit {proc.returncode}; last line: {last[:300]}")
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Run a function in W CPU processes joined in a gloo process group, for the data-parallel tests.

    out = run_ranks(fn, world=2, args=(...,), tmp=tmp_path)   # fn(rank, world, *args) -> picklable; [rank0, rank1]

``fn`` must be a module-level function (spawned processes import it). The group is initialised through a file
store in ``tmp`` (no port to pick, so no race for a free port); gloo's own traffic goes over loopback. Each rank's
return value comes back through a file; an exception in a rank fails the test with that rank's traceback. A
generous deadline (the machine may be busy) ends hung ranks instead of hanging the test run.
"""
from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, fn, args, tmp: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    out = Path(tmp) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": result}, out)
    except BaseException:  # noqa: BLE001  report it to the parent, which fails the test with it
        torch.save({"error": traceback.format_exc()}, out)
        raise


def run_ranks(fn, world: int, args: tuple, tmp: Path, timeout: float = 600.0) -> list:
    tmp = Path(tmp) / f"ranks-{fn.__name__}"
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_entry, args=(world, fn, args, str(tmp)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while not ctx.join(timeout=5):
            if datetime.datetime.now() > deadline:
                raise AssertionError(f"ranks did not finish within {timeout}s")
    except mp.ProcessRaisedException:
        pass  # the rank's traceback is in its file; reported below
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    results = []
    for r in range(world):
        f = tmp / f"rank{r}.pt"
        assert f.exists(), f"rank {r} wrote no result (killed?)"
        d = torch.load(f, weights_only=False)
        if "error" in d:
            raise AssertionError(f"rank {r} failed:\n{d['error']}")
        results.append(d["ok"])
    return results

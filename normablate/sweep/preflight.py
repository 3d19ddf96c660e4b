"""Sweep preflight: before the first trial, build one trial's data and model (the first grid point of each distinct
data config), so a bad ``data.source``, a missing split or column, or a model that cannot take the data's shape ends
the sweep at once (``ConfigError``, exit 2, one line) instead of every trial starting and crashing the same way.

The data is set up as the first trial would set it up (``prepare_data`` + ``setup``): decoded once and cached, so
the trials that follow read the cache and nothing is wasted. The model is built on the meta device and run
forward on meta tensors of one batch's shape (``footprint.check_fits``: no memory, no initialisation), which also
refuses a model that cannot fit this machine. Only for sweeps whose trials call ``normablate.train:train`` (a
custom ``trainer_fn`` or ``--dry-run`` may use other data).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal

from ..errors import ConfigError, NormablateError
from ..signals import die_with_parent, held, release
from .spec import DEFAULT_TRAINER, SweepSpec


def _data_key(d: dict) -> str:
    """Grid points with the same data (batch sizes aside: they do not change what is read) share one check."""
    data = {k: v for k, v in (d.get("data") or {}).items() if k not in ("batch_size", "val_batch_size")}
    return json.dumps({"data": data, "task": d.get("task"), "backbone": (d.get("model") or {}).get("backbone")},
                      sort_keys=True, default=str)


def preflight(spec: SweepSpec) -> str | None:
    """Check the data of every distinct data config of the grid (usually one) and, for the first grid point of
    each, the model; returns a one-line summary, or None when skipped."""
    if spec.trainer_fn != DEFAULT_TRAINER:
        return None
    params = spec.search_params_for_validation()[0]
    firsts: dict[str, object] = {}
    for point in spec.points():  # (raw dicts: no validation per point, so a large grid costs nothing here)
        firsts.setdefault(_data_key(spec.trial_dict(point, params, run="preflight")), point)
    lines = [_check_point(spec, point, params) for point in firsts.values()]
    return lines[0] if len(lines) == 1 else f"preflight: {len(lines)} data sets and their models are fine" \
        if lines else None


def _check_point(spec: SweepSpec, point, params) -> str:
    where = f"sweep {spec.study_name!r}, preflight of grid point [{point.label(spec.axes)}]"
    cfg = spec.trial_config(point, params, run="preflight")
    from .. import footprint
    from ..data import build_datamodule

    try:
        dm = build_datamodule(cfg.data, cfg.task, cfg.seed)
        dm.prepare_data()
        dm.setup("fit")
        fp = footprint.check_fits(cfg, dm)
    except NormablateError as e:
        raise ConfigError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001  every trial would crash the same way: one line now, the cause chained
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ConfigError(f"{where}: data.source={cfg.data.source!r} with model {cfg.model.backbone!r} fails before "
                          f"training: {type(e).__name__}: {first} (normablate --debug sweep ... shows the traceback)"
                          ) from e
    shape = getattr(dm, "image_size", None) or cfg.data.block_size
    return (f"preflight: {cfg.data.source} ({dm.num_train:,} training examples, shape {shape}) and "
            f"{cfg.model.backbone} ({fp.params:,} parameters) are fine")


def preflight_isolated(spec: SweepSpec) -> str | None:
    """``preflight`` in a spawned child process: with several workers the sweep's own process only supervises and
    never imports Lightning (the data modules do); the child's decoded data lands in the cache the workers read.
    The child ignores a terminal's Ctrl-C; this process decides: an exception here (a stop: ``Interrupted``, see
    ``runner.run_sweep``) ends the child before it propagates. The child also dies with this process."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(spec, send, os.getpid()), name="preflight")
    answered = False
    try:
        with held():  # (a Ctrl-C while it imports waits for _child, which ignores it: no traceback; this process
            child.start()  # gets it when the block ends, inside this try)
        send.close()
        try:
            kind, text = receive.recv()
        except EOFError:
            kind, text = None, None
        answered = True
    finally:
        receive.close()
        send.close()
        if child.pid is not None:
            _end(child, stop=not answered)
    if kind is None:
        raise ConfigError(f"sweep {spec.study_name!r}: the preflight process ended without an answer (exit code "
                          f"{child.exitcode}: killed or out of memory?); run the command again, or with --workers 1 "
                          f"to see the error")
    if kind == "error":
        raise ConfigError(text)
    return text


def _end(child, stop: bool) -> None:
    """Wait for the preflight child (bounded); ``stop``: end it first (SIGTERM: it removes a cache file it was
    writing; SIGKILL after 30 s)."""
    if stop and child.is_alive():
        child.terminate()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        child.join()


def _stop(signum, frame) -> None:  # noqa: ARG001
    raise SystemExit(130)  # (not the default death: a cache file being written is removed on the way out)


def _child(spec: SweepSpec, send, parent: int) -> None:
    die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the parent too, which decides
    signal.signal(signal.SIGTERM, _stop)
    release()  # (a SIGTERM held since its start ends it here; a held SIGINT is dropped)
    try:
        answer = ("ok", preflight(spec))
    except ConfigError as e:
        answer = ("error", str(e))
    except Exception as e:  # noqa: BLE001  one line for the parent, as preflight's own errors
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        answer = ("error", f"sweep {spec.study_name!r}, preflight: {type(e).__name__}: {first}")
    with contextlib.suppress(OSError):  # (the parent gone, or stopped: nobody reads it)
        send.send(answer)
    send.close()

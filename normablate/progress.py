"""Live progress of runs and sweeps: what each worker's trial is doing now, and when the study will be done.

* ``step_reporter`` (a Lightning callback) turns a run into progress events: ``{"step", "total", "metric", "value",
  "eta"}``, at most every ``interval`` seconds and after every validation, handed to a ``sink`` (a function).
* ``Board`` draws them. On a terminal: one line per worker, refreshed in place below the log lines, plus the
  study's line (done/total, ETA). Elsewhere (a file, a pipe, a CI log): plain lines, one per worker at most every
  ``plain_every`` seconds (30) or when its trial has advanced another tenth, so a log stays readable and still
  shows a sweep is alive.

Sweep workers are separate processes: each sends its events (and its log lines, so they do not tear the refreshed
block) through a ``multiprocessing`` queue to the sweep command, whose ``Board`` draws them
(``sweep/supervise.py``). A one-worker sweep and ``normablate train`` feed a ``Board`` in process.

Hand-written rather than tqdm/rich: several processes feed one display, and a non-terminal gets rate-limited
plain lines instead of carriage-return frames.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@functools.cache
def _reporter_class():
    import lightning as L  # (only a process that trains gets here: the sweep command's own process never does)

    class StepReporter(L.Callback):
        """Progress events of one run: step/total, the last value of ``metric`` and an ETA from this run's own step
        rate (steps since it started or resumed). Sent at most every ``interval`` s, after each validation and at
        the end."""

        def __init__(self, sink: Callable[[dict[str, Any]], None], metric: str, interval: float = 1.0,
                     **fields: Any) -> None:
            self.sink, self.metric, self.interval, self.fields = sink, metric, interval, fields
            self.value: float | None = None
            self._t0 = self._last = 0.0
            self._step0 = 0

        def _send(self, trainer: L.Trainer, final: bool = False) -> None:
            step, total = int(trainer.global_step), int(getattr(trainer, "max_steps", 0) or 0)
            now = time.monotonic()
            if not self._t0:  # (a trainer that never called on_train_start: the dry-run trainer)
                self._t0, self._step0 = now, 0
            rate = (step - self._step0) / (now - self._t0) if now > self._t0 and step > self._step0 else 0.0
            eta = (total - step) / rate if rate > 0 else None
            self._last = now
            self.sink({**self.fields, "step": step, "total": total, "metric": self.metric, "value": self.value,
                       "eta": 0.0 if final else eta})

        def on_train_start(self, trainer, pl_module) -> None:
            self._t0 = self._last = time.monotonic()
            self._step0 = int(trainer.global_step)
            self._send(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if time.monotonic() - self._last >= self.interval:
                self._send(trainer)

        def on_validation_end(self, trainer, pl_module) -> None:
            v = trainer.callback_metrics.get(self.metric)
            if v is not None:
                self.value = float(v)
            self._send(trainer)

        def on_train_end(self, trainer, pl_module) -> None:
            self._send(trainer, final=True)

    return StepReporter


def step_reporter(sink: Callable[[dict[str, Any]], None], metric: str, interval: float = 1.0, **fields: Any):
    """A ``StepReporter`` callback (a Lightning callback; the class is built on first use, so importing this module
    does not import Lightning)."""
    return _reporter_class()(sink, metric, interval, **fields)


def trial_line(e: dict[str, Any]) -> str:
    """``w0 trial 7 bn lr=0.1 s0: step 1200/5000 (24%) val/acc 0.512 ETA 4:10``"""
    total = max(int(e.get("total") or 0), 1)
    head = " ".join(str(x) for x in (e.get("worker"), f"trial {e['trial']}" if e.get("trial") is not None else None,
                                     e.get("label")) if x)
    value = e.get("value")
    metric = f" {e['metric']} {value:.4g}" if value is not None and e.get("metric") else ""
    return (f"{head + ': ' if head else ''}step {e['step']}/{total} ({100 * e['step'] // total}%){metric} "
            f"ETA {fmt_time(e.get('eta'))}")


class Board:
    """Draws progress events, one line per worker, and log lines (see the module doc)."""

    def __init__(self, out: TextIO | None = None, tty: bool | None = None, plain_every: float = 30.0,
                 refresh: float = 0.5) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.plain_every, self.refresh = plain_every, refresh
        self.rows: dict[str, dict[str, Any]] = {}  # worker -> its last event
        self.study: dict[str, Any] | None = None  # the study's last event (its line, remaining trials, ETA)
        self._started: dict[tuple[str, Any], float] = {}  # (worker, trial) -> when its first event came
        self._drawn = 0  # lines of the live block now on screen (terminal)
        self._drawn_at = 0.0
        self._plain: dict[str, tuple[float, int]] = {}  # worker -> (time, step) of its last plain line

    # --------------------------------------------------------------------------------------------- input
    def update(self, e: dict[str, Any]) -> None:
        """A progress event (``StepReporter``'s, with ``worker``), a log line ``{"log": text}``, the study's line
        ``{"study": text}`` or the end of a worker's trial ``{"worker": w, "done": True}``."""
        if "log" in e:
            self.log(e["log"])
            return
        if "study" in e:
            self.study = e
            self._draw(force=True)  # (not a terminal: the sweep's own log lines print the study's state)
            return
        w = str(e.get("worker") or "")
        if e.get("done"):
            self.rows.pop(w, None)
            self._plain.pop(w, None)
            self._started = {k: v for k, v in self._started.items() if k[0] != w}
            self._draw(force=True)
            return
        self.rows[w] = e
        self._started.setdefault((w, e.get("trial")), time.monotonic())
        if self.tty:
            self._draw()
        else:
            self._plain_line(w, e)

    def log(self, text: str) -> None:
        """A log line: above the live block on a terminal (which is then drawn again below it)."""
        self._clear()
        print(text, file=self.out, flush=True)
        self._draw(force=True)

    def close(self) -> None:
        self._clear()
        self.rows.clear()

    # --------------------------------------------------------------------------------------------- output
    def lines(self) -> list[str]:
        rows = [trial_line(self.rows[w]) for w in sorted(self.rows)]
        return rows + ([self.study_line()] if self.study else [])

    def study_eta(self) -> float | None:
        """The study's ETA: the running trials' remaining time plus the trials not started yet at the running
        trials' estimated length, spread over the workers; else the study's own (finished trials per second)."""
        s = self.study or {}
        rows = list(self.rows.items())
        if rows and all(r.get("eta") is not None for _, r in rows):
            now = time.monotonic()
            lengths = [now - self._started.get((w, r.get("trial")), now) + r["eta"] for w, r in rows]
            left = sum(r["eta"] for _, r in rows)
            left += max(0, int(s.get("remaining", 0)) - len(rows)) * sum(lengths) / len(lengths)
            return left / len(rows)
        return s.get("eta")

    def study_line(self) -> str:
        s = self.study or {}
        running = f", {len(self.rows)} running" if self.rows else ""
        return f"{s.get('study', '')}{running} | ETA {fmt_time(self.study_eta()) if s.get('remaining') else '0:00'}"

    def _plain_line(self, w: str, e: dict[str, Any]) -> None:
        now = time.monotonic()
        last_t, last_step = self._plain.get(w, (None, None))
        total = max(int(e.get("total") or 0), 1)
        tenth = last_step is None or (e["step"] - last_step) * 10 >= total
        if last_t is None or now - last_t >= self.plain_every or (tenth and e["step"] > (last_step or 0)) \
                or e.get("eta") == 0.0:
            self._plain[w] = (now, e["step"])
            print(trial_line(e), file=self.out, flush=True)

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")  # to the block's first line, erase to the end of screen
            self.out.flush()
            self._drawn = 0

    def _draw(self, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < self.refresh:
            return
        self._clear()
        lines = self.lines()
        width = _width(self.out)
        for line in lines:
            self.out.write(line[:width - 1] + "\n")
        self.out.flush()
        self._drawn, self._drawn_at = len(lines), now


def _width(out: TextIO) -> int:
    import os

    try:
        columns = os.get_terminal_size(out.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    return columns if columns > 20 else 160  # (a pseudo-terminal may report 0 columns)


def plain_progress(label: str, metric: str, out: TextIO | None = None, every: float = 30.0):
    """``normablate train``'s progress when stdout is not a terminal: a plain line every ``every`` s or tenth of the
    run (a terminal gets the refreshed bar, ``step_progress_bar``)."""
    board = Board(out=out, tty=False, plain_every=every)
    reporter = step_reporter(board.update, metric, label=label)
    start = reporter.on_train_start

    def on_train_start(trainer, pl_module) -> None:  # as the terminal's bar does: say where a resumed run goes on
        if trainer.global_step > 0:
            print(f"resuming from step {trainer.global_step} of {trainer.max_steps}", file=sys.stderr, flush=True)
        start(trainer, pl_module)

    reporter.on_train_start = on_train_start
    return reporter


def step_progress_bar(max_steps: int):
    """``normablate train``'s progress on a terminal: a ``StepProgressBar`` (a Lightning callback) over ``max_steps``
    optimizer steps."""
    return _step_progress_bar_class()(max_steps)


@functools.cache
def _step_progress_bar_class() -> type:
    """``StepProgressBar``, Lightning's ``TQDMProgressBar`` counting optimizer steps. Defined on first use: the sweep
    command imports this module and must not import Lightning (tests/sweep/test_supervisor_imports.py)."""
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    class StepProgressBar(TQDMProgressBar):
        """Progress over optimizer steps (the training stream is infinite, so Lightning knows no total)."""

        def __init__(self, max_steps: int) -> None:
            super().__init__(refresh_rate=10)
            self._max_steps = max_steps

        @property
        def total_train_batches(self):
            return self._max_steps

        def init_train_tqdm(self):
            """The one bar of the run, created with its final description, total and start (a resumed run starts
            at its step), so no 'Training 0/?' or 'Epoch 0' bar is printed first."""
            trainer = self.trainer
            step = trainer.global_step
            if step > 0:
                print(f"resuming from step {step} of {self._max_steps}", file=sys.stderr, flush=True)
            return Tqdm(desc=f"train {trainer.lightning_module.run_label}", total=self._max_steps, initial=step,
                        position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                        file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

        def init_validation_tqdm(self):
            """Disabled from the start (one bar per run; a disabled-after-creation bar still prints its first
            line). While it runs, the training bar says so."""
            return Tqdm(disable=True)

        def init_test_tqdm(self):
            """The end-of-run test evaluation (evaluate.py) prints no bar of its own."""
            return Tqdm(disable=True)

        def on_validation_start(self, trainer, pl_module) -> None:
            super().on_validation_start(trainer, pl_module)
            if self._train_progress_bar is not None:
                self.train_progress_bar.set_description(f"validate {pl_module.run_label}")

        def on_validation_end(self, trainer, pl_module) -> None:
            super().on_validation_end(trainer, pl_module)
            if self._train_progress_bar is not None:
                self.train_progress_bar.set_description(f"train {pl_module.run_label}")

        def get_metrics(self, trainer, pl_module):
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)
            return metrics

        def on_train_epoch_start(self, trainer, *args) -> None:
            pass  # Lightning's resets the bar to "Epoch 0", 0/?: ours is one endless epoch (init_train_tqdm)

    return StepProgressBar


def __getattr__(name: str) -> Any:  # progress.StepProgressBar: the class, defined on first use (PEP 562)
    if name == "StepProgressBar":
        return _step_progress_bar_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

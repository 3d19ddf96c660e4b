"""Dead workers: fail the RUNNING trials of workers that died or went silent, and enqueue their retries.

Before claiming work, every worker fails RUNNING trials whose heartbeat value has not changed for
``heartbeat.grace`` seconds of its own clock (so clock skew between machines cannot kill a live trial) or whose
process is gone (same host, pid not alive), and enqueues a retry that keeps the point, the params and the run
directory, so the retry resumes from the run's ``last.ckpt``. Failing a trial is atomic, so only one worker
enqueues the retry; a point is retried at most ``heartbeat.max_retry`` times per command.
"""
from __future__ import annotations

import os
import time

import optuna
from optuna.trial import TrialState

from .liveness import HOST, pid_alive
from .queue import retry_of
from .storage import retry


class ReaperMixin:
    """Reaping and re-queueing (part of ``runner.Sweep``)."""

    # ------------------------------------------------------------------ dead workers
    def reap_stale(self) -> int:
        """Fail RUNNING trials of dead workers and enqueue their retries. Returns how many were reaped."""
        grace = float(self.spec.heartbeat["grace"])
        now = time.time()
        n = 0
        for study, group in self.studies:
            for t in retry(lambda s=study: s.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
                if t._trial_id in self.my_trials:
                    continue
                w = t.system_attrs.get("nb:worker") or {}
                beat = t.system_attrs.get("nb:heartbeat")
                if beat is None and t.datetime_start is not None:
                    beat = t.datetime_start.timestamp()
                dead = w.get("host") == HOST and isinstance(w.get("pid"), int) and w["pid"] != os.getpid() \
                    and not pid_alive(w["pid"])
                # Silent = the heartbeat *value* has not changed for `grace` seconds of this machine's clock
                # (never compare another machine's timestamps with ours: clock skew would kill live trials).
                seen_value, seen_at = self._beats.get(t._trial_id, (None, now))
                if beat != seen_value:
                    seen_value, seen_at = beat, now
                self._beats[t._trial_id] = (seen_value, seen_at)
                silent = beat is not None and now - seen_at > grace
                if not (dead or silent):
                    continue
                try:
                    if not self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                        continue
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # finished meanwhile, or another worker reaped it first
                why = "its worker process is gone" if dead else f"no heartbeat for {now - seen_at:.0f}s"
                head = f"trial {t.number} ({t.user_attrs.get('run', '?')}) failed: {why}"
                try:
                    what = self._requeue(study, t, reason=why)
                except Exception:  # the trial stays FAIL (nothing is lost: re-running retries it); say so first
                    self.log(f"{head}; its retry could not be queued (storage error); re-run the command to retry it")
                    raise
                self.log(f"{head}; {what}")
                n += 1
        return n

    def _retry_refused(self, t: optuna.trial.FrozenTrial) -> str | None:
        """Why failed trial ``t`` gets no retry from this command (it has used the command's ``max_retry``), or
        None. Retries count from the command's start (``nb:rerun_at``): running the command again gives more, and so
        does a stop by a signal (``_interrupt``: its retry belongs to the command that resumes it). A trial left
        RUNNING by a command that was killed (SIGKILL) counts against the command whose reaper finds it."""
        attempts = len(t.system_attrs.get("nb:retry_of", [])) + 1
        if attempts - int(t.system_attrs.get("nb:rerun_at", 0)) > int(self.spec.heartbeat["max_retry"]):
            return f"not retried again ({attempts} attempts); re-run the command to retry"
        return None

    def _requeue(self, study: optuna.Study, t: optuna.trial.FrozenTrial, reason: str) -> str:
        """Enqueue a retry of failed trial ``t`` (``queue.retry_of``: it resumes in its own folder) unless
        ``_retry_refused``; the words for the log."""
        refused = self._retry_refused(t)
        if refused is None:
            retry(lambda: study.add_trial(retry_of(t, reason, rerun=False)))
        return refused or "queued again"

    # ------------------------------------------------------------------ claiming and running

"""``normablate sweep``: the argparse part and the sweep itself. The top-level CLI (``normablate.cli``) wires it in
as a subcommand and chains the report after it (sweep -> report); this module never imports ``report``."""
from __future__ import annotations

import argparse
import sys

from .runner import SweepResult


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="sweep spec YAML (e.g. configs/sweeps/quick.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="run-config overrides for every trial, e.g. trainer.max_steps=50 trainer.accelerator=gpu")
    p.add_argument("--storage", help="Optuna storage: a SQLAlchemy URL (postgresql://user@host/db), a journal file "
                                     "(journal:PATH or PATH.log), or PATH.db (default: sqlite:///<log_dir>/optuna.db)")
    p.add_argument("--study-name", help="study name (default: the spec's study_name, else the spec file's name)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1); other "
                                                          "machines join with the same command and --storage")
    p.add_argument("--dry-run", action="store_true", help="fake instant runs (normablate.sweep.dryrun) to check the "
                                                          "spec, storage and report; study name gets '-dryrun'")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not write the report when the sweep is complete")
    p.add_argument("--check", action="store_true", help="validate the spec and every trial config, then exit")


def run_command(args: argparse.Namespace) -> tuple[int, SweepResult | None]:
    """Run (or ``--check``) the sweep; returns (exit code, result or None when nothing ran)."""
    from .runner import run_sweep
    from .spec import load_spec

    from .. import plugins

    extra = list(getattr(args, "plugin", None) or [])
    plugins.load(extra)  # before the spec's norm names are checked
    spec = load_spec(args.config, overrides=args.overrides, study_name=args.study_name, dry_run=args.dry_run)
    if extra:  # every trial (workers, other machines) loads them too: they travel in the trial configs
        have = [*(spec.base.get("plugins") or []), *(spec.overrides.get("plugins") or [])]
        spec.overrides["plugins"] = have + [p for p in extra if p not in have]
    if args.check:
        n = spec.validate_all()
        hyps = len(spec.hypotheses)
        print(f"sweep {spec.study_name!r} ({spec.kind}): {spec.total} trials; {n} run configs valid"
              + (f"; {hyps} pre-registered hypothes{'is' if hyps == 1 else 'es'} valid" if hyps else ""))
        from ..errors import ConfigError
        from .ddp_trial import check_resources

        try:  # the hardware is the running machine's business: a note here, refused there (before any trial)
            check_resources(spec, args.workers)
        except ConfigError as e:
            print(f"note: this machine could not run it with --workers {args.workers}: {e}")
        return 0, None
    res = run_sweep(spec, storage=args.storage, workers=args.workers)
    if res.exit_code == 130:
        print("interrupted: run the same command again to continue (finished trials are kept)")
    return res.exit_code, res


def finish(res: SweepResult) -> None:
    """What to say after the report (or instead of it): trials left to run."""
    if not res.complete and res.exit_code != 130:
        print(f"{res.counts.total - res.counts.done} trial(s) not done; run the same command again to retry them",
              file=sys.stderr)


def cmd_sweep(args: argparse.Namespace) -> int:
    """The sweep alone (no report): for callers that chain their own report."""
    code, res = run_command(args)
    if res is not None:
        finish(res)
    return code

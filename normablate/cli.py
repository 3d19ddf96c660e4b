"""Command line: thin. Parse, validate, call ``train`` / ``sweep`` / ``report`` / ``bench``.

Start-up: nothing heavy (torch, timm, Lightning, Optuna, pandas, matplotlib) is imported before the command
needs it, so ``--help`` and ``--version`` answer at once; the sweep/report parsers (which import their
packages) are built only when that command is given.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

from . import __version__
from .errors import NormablateError

# run-config sections: config.SECTIONS, repeated here for the same reason (tests/test_cli.py checks them)
CONFIG_SECTIONS = ("model", "data", "optim", "trainer", "probes")
# LightningCLI's other subcommands, and what a normablate user runs instead (``fit`` is an alias of ``train``)
LIGHTNING_COMMANDS = {
    "validate": "a run validates every trainer.val_every steps and at its end: normablate train ...",
    "test": "a run evaluates its test split at its end: normablate train ...",
    "predict": "normablate trains and compares; it has no prediction loop",
}


class HabitError(Exception):
    """A Lightning (jsonargparse) spelling normablate cannot map unambiguously; its message is the one-line hint."""


def _options_of(parser: argparse.ArgumentParser, command: str | None) -> set[str]:
    """The option strings (``--print-config``, ...) of the parser of ``command`` (all parsers' when unknown)."""
    options = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):  # choices: name or alias -> its parser
            subs = action.choices.values() if command is None else [action.choices.get(command)]
            for sub in subs:
                options |= set(sub._option_string_actions) if sub is not None else set()
    return options


def lightning_habits(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """LightningCLI spellings rewritten to normablate's, where the meaning is unambiguous:

    * ``--trainer.max_steps 10`` and ``--trainer.max_steps=10`` -> ``trainer.max_steps=10`` (any dotted key of a
      run-config section; a value that is missing, or looks like another option, raises ``HabitError``);
    * ``--print_config``, ``--study_name``, ... -> ``--print-config``, ``--study-name`` when that option exists;
    * ``fit`` is an alias of ``train`` (argparse); ``validate`` / ``test`` / ``predict`` raise ``HabitError``
      with what to run instead.
    Everything else is left to argparse (whose errors then name the normablate form)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in LIGHTNING_COMMANDS:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        instead = LIGHTNING_COMMANDS[command]
        if "evaluate" in sub.choices and command in ("test", "validate"):
            split = "test" if command == "test" else "val"
            instead = (f"evaluate a trained run with: normablate evaluate RUN_DIR --split {split} "
                       f"(train: normablate train)")
        raise HabitError(f"normablate has no {command!r} subcommand (LightningCLI's); {instead}")
    known = _options_of(parser, command)
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, eq, value = arg.partition("=")
        key = name[2:]
        if arg.startswith("--") and "." in key and key.split(".")[0] in CONFIG_SECTIONS:
            if not eq:  # the value is the next argument
                nxt = argv[i] if i < len(argv) else None
                if nxt is None or nxt.startswith("--") or (
                        "=" in nxt and nxt.partition("=")[0].split(".")[0] in CONFIG_SECTIONS):
                    raise HabitError(f"{arg} needs a value; normablate takes key=value overrides: {key}=VALUE")
                value = nxt
                i += 1
            out.append(f"{key}={value}")
        elif arg.startswith("--") and "_" in name and name not in known and name.replace("_", "-") in known:
            out.append(name.replace("_", "-") + eq + value)
        elif arg in ("--print_config", "--print-config") and "--print-config" not in known:
            raise HabitError(f"normablate {command or '<command>'} has no --print-config; "
                             + ("check a sweep spec with: normablate sweep --config SPEC --check" if command == "sweep"
                                else "print a run's resolved config with: normablate train ... --print-config"))
        else:
            out.append(arg)
    return out


def cmd_list(args: argparse.Namespace) -> int:
    from . import models, norms, plugins

    plugins.load(args.plugin)

    print("norms:")
    for name in norms.available():
        print(f"  {name:<12} options: {', '.join(norms.options(name)) or '-'}")
    print("backbones:")
    for name in models.available():
        opts = ", ".join(f"{k}={v!r}" for k, v in models.options(name).items())
        print(f"  {name:<15} [{models.layout(name)}] {opts}")
    print(f"  {'timm/<name>':<15} any timm model, e.g. timm/convnext_atto (names: timm.list_models()); options: "
          "timm.create_model's")
    return 0


def format_summary(result) -> str:
    lines = [f"run      {result.run_dir}", f"status   {result.status}"
             + (f" at step {result.diverged_step}" if result.diverged_step is not None else ""),
             f"steps    {result.steps}   wall {result.wall_time:.1f}s   throughput {result.throughput:,.0f}/s"]
    for k in sorted(result.final):
        best = result.best.get(k)
        lines.append(f"{k:<24} {result.final[k]:.4f}" + (f"   (best {best:.4f})" if best is not None else ""))
    at_best = getattr(result, "test_at_best", None) or {}
    for k in sorted(getattr(result, "test", None) or {}):  # the held-out test split, evaluated once at the end
        lines.append(f"{k:<24} {result.test[k]:.4f}" + (f"   (best-val weights, step {result.best_step}: "
                                                        f"{at_best[k]:.4f})" if k in at_best else ""))
    if result.steps_to_target is not None:
        lines.append(f"target reached at step {result.steps_to_target} ({result.time_to_target:.1f}s)")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides, plugins=args.plugin)  # validates; nothing built yet
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from .runfolder import run_dir_of
    from .train import train

    run_dir = run_dir_of(cfg)
    if args.resume and not (run_dir / "last.ckpt").exists() and not (run_dir / "result.json").exists():
        print(f"--resume: no checkpoint in {run_dir}; starting this run from scratch", file=sys.stderr)
    result = train(cfg, resume=args.resume)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:  # DDP: the other ranks ran the same run; rank 0 reports it
        return 130 if result.status == "interrupted" else 0
    print(format_summary(result))
    if result.status == "interrupted":
        print("interrupted: a checkpoint was saved; continue with the same command plus --resume")
        return 130
    return 0


def cmd_sweep_and_report(args: argparse.Namespace) -> int:
    """``normablate sweep``: the sweep, then (unless --no-report or interrupted) its report and headline."""
    from .sweep.cli import finish, run_command

    code, res = run_command(args)
    if res is None:
        return code
    verdicts: list[str] = []
    if args.report and res.counts.done and code != 130:
        from .report import first_line, verdict_lines, write_report

        out = write_report(res.study_name, storage=res.storage)
        print(f"report: {out / 'summary.md'}  (tables: summary.csv, plots: *.png in {out})")
        print(f"headline: {first_line(out / 'summary.md')}")
        verdicts = verdict_lines(out)
    finish(res)
    for line in verdicts:  # the pre-registered hypotheses' verdicts are the job's last lines
        print(line, flush=True)
    return code


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import plugins
    from .evaluate import cmd_evaluate as run

    plugins.load(args.plugin)
    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import cmd_bench as run

    return run(args)


def add_plugin_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="import this .py file or module first (it registers norms/backbones); repeatable; "
                        "recorded in the config's plugins list (runs its code: trust it)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; ``command`` (the subcommand about to run) decides which heavy subparsers are built."""
    parser = argparse.ArgumentParser(prog="normablate", description="Ablate normalization layers.")
    parser.add_argument("--version", action="version", version=f"normablate {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected error (also: NORMABLATE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list registered norms and backbones with their options")
    add_plugin_argument(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("train", aliases=["fit"],
                       help="one training run from a YAML config plus key=value overrides (alias: fit)")
    p.add_argument("--config", "-c", help="run config YAML (e.g. configs/runs/resnet20_cifar10.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.norm=ln optim.lr=0.05 (also "
                                                                      "LightningCLI's --trainer.max_steps 10)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit (also: --print_config)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last.ckpt")
    add_plugin_argument(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="benchmark norms, framework overhead, inference and start-up (docs/)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (about a minute)")
    p.add_argument("--out", default="docs", help="folder for benchmarks.md and benchmarks.csv (default: docs)")
    p.add_argument("--compile", action="store_true", help="also time every norm under torch.compile (slow)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--norms", nargs="+", metavar="NAME", help="norm rows for these norms only (default: all)")
    p.add_argument("--sweep", action="store_true",
                   help="add the sweep section: the quick sweep with --workers 1 vs 2 (several minutes)")
    p.add_argument("--cifar10", metavar="SOURCE", help="CIFAR-10 for the data section: a local copy (default: "
                                                       "$NORMABLATE_BENCH_CIFAR10, else the hub)")
    from .bench.sections import names as bench_sections  # torch-free: the section modules, found unimported

    p.add_argument("--only", nargs="+", metavar="SECTION", choices=bench_sections(),
                   help="run only these sections: " + " ".join(bench_sections()))
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("evaluate", help="evaluate a run folder's checkpoint on the validation or test split")
    p.add_argument("run_dir", help="a run folder (lightning_logs/<experiment>/<run>/)")
    p.add_argument("--split", default="test", choices=("val", "test"), help="which split (default: test)")
    p.add_argument("--stats", default="running", choices=("running", "batch", "precise"),
                   help="BN statistics: running (eval mode, default), batch (each batch's own), precise (PreciseBN)")
    p.add_argument("--checkpoint", default="last", choices=("last", "best"),
                   help="last.ckpt (default), or best.pt (the best validation's weights)")
    p.add_argument("--precise-batches", type=int, default=None, metavar="N",
                   help="--stats precise: training batches for the population statistics (default: the run's "
                        "trainer.precise_bn, else 100)")
    add_plugin_argument(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sweep", help="run an ablation sweep (an Optuna study) from a sweep spec")
    if command == "sweep":
        from .sweep.cli import add_sweep_arguments

        add_sweep_arguments(p)
        add_plugin_argument(p)
        p.set_defaults(func=cmd_sweep_and_report)
    p = sub.add_parser("report", help="tables and plots of a finished or running study")
    if command == "report":
        from .report import add_report_arguments, cmd_report

        add_report_arguments(p)
        p.set_defaults(func=cmd_report)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first argument that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    from .alloc import configure

    configure()  # glibc malloc thresholds: no page faults for every large tensor (alloc.py)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    try:
        argv = lightning_habits(argv, parser)
    except HabitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("NORMABLATE_DEBUG", "") not in ("", "0")
    before = os.environ.get("NORMABLATE_DEBUG")
    if debug:  # sweep workers and trials see it too (a failed trial prints its traceback only then)
        os.environ["NORMABLATE_DEBUG"] = "1"
    try:
        return _run(args, debug)
    finally:
        if before is None:
            os.environ.pop("NORMABLATE_DEBUG", None)
        else:
            os.environ["NORMABLATE_DEBUG"] = before


def _run(args: argparse.Namespace, debug: bool) -> int:
    """``args.func(args)``; errors become one line and an exit status (the traceback only when ``debug``)."""
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside a run's own handler (setting up, a second Ctrl-C): what ran is
        if debug:  # checkpointed or re-queued by then; one line, the interrupted status
            raise
        print("interrupted (run the same command again to continue)", file=sys.stderr)
        return 130
    except NormablateError as e:  # bad input, refused before anything ran, or a file we cannot use
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the user controls (permissions, disk full, missing path)
        if debug:
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            from .sweep.storage import disk_full_message

            print(f"error: {disk_full_message(e)}", file=sys.stderr)
            return 2
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{':' + where if where else ''}; check that the path exists and is "
              f"writable (NORMABLATE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours or a library's: one line, and how to see the traceback
        if debug:
            raise
        from .sweep.storage import disk_full_message, is_disk_full

        if is_disk_full(e):  # (e.g. torch's writer reports ENOSPC as a RuntimeError)
            print(f"error: {disk_full_message(e)}", file=sys.stderr)
            return 2
        print(f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (rerun with "
              f"--debug or NORMABLATE_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

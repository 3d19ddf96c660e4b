"""Command line: thin. Parse, validate, call ``train`` / ``sweep`` / ``report``."""
from __future__ import annotations

import argparse
import sys

from . import models, norms
from .errors import NormablateError


def cmd_list(args: argparse.Namespace) -> int:
    print("norms:")
    for name in norms.available():
        print(f"  {name:<12} options: {', '.join(norms.options(name)) or '-'}")
    print("backbones:")
    for name in models.available():
        opts = ", ".join(f"{k}={v!r}" for k, v in models.options(name).items())
        print(f"  {name:<15} [{models.layout(name)}] {opts}")
    return 0


def format_summary(result) -> str:
    lines = [f"run      {result.run_dir}", f"status   {result.status}"
             + (f" at step {result.diverged_step}" if result.diverged_step is not None else ""),
             f"steps    {result.steps}   wall {result.wall_time:.1f}s   throughput {result.throughput:,.0f}/s"]
    for k in sorted(result.final):
        best = result.best.get(k)
        lines.append(f"{k:<24} {result.final[k]:.4f}" + (f"   (best {best:.4f})" if best is not None else ""))
    if result.steps_to_target is not None:
        lines.append(f"target reached at step {result.steps_to_target} ({result.time_to_target:.1f}s)")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)  # validates; nothing built yet
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from .train import train

    result = train(cfg, resume=args.resume)
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
    if args.report and res.counts.done and code != 130:
        from .report import first_line, write_report

        out = write_report(res.study_name, storage=res.storage)
        print(f"report: {out / 'summary.md'}  (tables: summary.csv, plots: *.png in {out})")
        print(f"headline: {first_line(out / 'summary.md')}")
    finish(res)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normablate", description="Ablate normalization layers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list registered norms and backbones with their options")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("train", help="one training run from a YAML config plus key=value overrides")
    p.add_argument("--config", "-c", help="run config YAML (e.g. configs/runs/resnet20_cifar10.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.norm=ln optim.lr=0.05")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", action="store_true", help="continue the run from its last.ckpt")
    p.set_defaults(func=cmd_train)

    from .report import add_report_arguments, cmd_report
    from .sweep.cli import add_sweep_arguments

    p = sub.add_parser("sweep", help="run an ablation sweep (an Optuna study) from a sweep spec")
    add_sweep_arguments(p)
    p.set_defaults(func=cmd_sweep_and_report)
    p = sub.add_parser("report", help="tables and plots of a finished or running study")
    add_report_arguments(p)
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NormablateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

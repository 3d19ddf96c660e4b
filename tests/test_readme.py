"""Every ``normablate ...`` command in the README's code blocks is pasteable into bash.

Each command is taken from the README text (indented and fenced shell blocks; ``a && b && normablate ...``
contributes its ``normablate`` part), its trailing ``# comment`` removed, and run through a real shell
(``bash -c``) with a flag that makes it cheap and side-effect free:

* ``train`` / ``fit``: ``--print-config`` (the config is loaded and validated, nothing built);
* ``sweep``: ``--check`` (the spec and every trial config are validated, nothing runs);
* ``bench`` and ``evaluate``: ``--help`` after the command's own options (argparse checks those options and
  their choices first; a bench takes minutes, evaluate needs a trained run folder);
* ``report``: as written, on a study of that name the test makes first (4 instant fake trials);
* ``list``: as written.

The commands run in a temporary copy of the repository's layout (``main/configs`` and ``shared`` linked), so
relative paths (``configs/...``, ``../shared/data/...``) resolve as from the repository root and nothing is
written into the checkout. The plug-in example (``my_norms.py``) is the README's own Python block, written to a
file as the README says; ``my_sweep.yaml`` (the user's own spec in the README) is a minimal grid over it.

Not run, with the reason: ``python3 -m venv``, ``pip install`` (create environments, download packages),
``python -m pytest`` (the test suite itself), ``tensorboard`` (a server that does not exit).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from support.procs import run_bounded

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# what each subcommand gets appended (None: run as written)
FLAG = {"train": "--print-config", "fit": "--print-config", "sweep": "--check", "bench": "--help",
        "evaluate": "--help", "report": None, "list": None}
# commands of the README's code blocks that are not normablate's, and why they are not run
NOT_RUN = {
    "python3": "creates a virtualenv",
    ".": "activates a virtualenv",
    "pip": "installs packages (network)",
    "python": "the test suite itself",
    "tensorboard": "starts a server that does not exit",
    "optuna-dashboard": "starts a server that does not exit",
    "mlflow": "starts a server that does not exit",
    "wandb": "talks to the W&B service (network, an account)",
}


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every shell line in the README's code blocks: fenced blocks whose language is
    empty, ``bash``, ``sh`` or ``console``, and indented (4-space) blocks that start after a blank line."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    prev_blank, in_indent = True, False
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence is not None:
            if fence in ("", "bash", "sh", "shell", "console") and line.strip():
                out.append((i, line.strip().removeprefix("$ ")))
            continue
        if line.startswith("    ") and line.strip() and (prev_blank or in_indent):
            in_indent = True
            out.append((i, line.strip()))
        elif line.strip():
            in_indent = False
        prev_blank = not line.strip()
    return out


def strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` that starts a word outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands() -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """(normablate commands as (line, command), skipped commands as (line, command, reason))."""
    run, skipped = [], []
    for no, line in code_lines(README.read_text()):
        for part in strip_comment(line).split("&&"):
            part = part.strip()
            if not part:
                continue
            words = part.split()
            while len(words) > 1 and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
                words = words[1:]  # environment assignments before the command (NORMABLATE_DEBUG=1 normablate ...)
            head = words[0]
            if head == "normablate":
                run.append((no, part))
            else:
                skipped.append((no, part, NOT_RUN.get(head, "")))
    return run, skipped


def python_block_after(text: str, heading: str) -> str:
    after = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_readme_has_commands_and_every_other_command_has_a_reason():
    run, skipped = readme_commands()
    subcommands = {c.split()[c.split().index("normablate") + 1] for _, c in run}
    assert {"train", "sweep", "report", "bench", "list"} <= subcommands, subcommands
    assert not [s for s in skipped if not s[2]], f"README code-block commands with no reason not to run them: {skipped}"


def test_strip_comment_keeps_quoted_hashes():
    assert strip_comment("normablate train 'a=#1'   # c") == "normablate train 'a=#1'"
    assert strip_comment("normablate train a=b#c") == "normablate train a=b#c"


MY_LM = """from torch import nn


class MyLM(nn.Module):
    def __init__(self, norm_layer, vocab_size, block_size, width):
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(vocab_size, width), norm_layer(width), nn.Linear(width, vocab_size)

    def forward(self, idx, mask=None):
        return self.head(self.norm(self.emb(idx), mask=mask) if mask is not None else self.norm(self.emb(idx)))


"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """``<tmp>/main`` with ``configs`` linked and ``<tmp>/shared`` linked to the checkout's ``../shared``, plus the
    README's plug-in file and a sweep spec over it; the study ``quick`` exists (dry run) for ``report``."""
    base = tmp_path_factory.mktemp("readme")
    main = base / "main"
    main.mkdir()
    (main / "configs").symlink_to(ROOT / "configs")
    if (ROOT.parent / "shared").exists():
        (base / "shared").symlink_to(ROOT.parent / "shared")
    (main / "my_norms.py").write_text(python_block_after(README.read_text(), "### Adding a norm"))
    # the README's backbone block names the user's own LM class (MyLM); a minimal one stands in for it here
    (main / "my_models.py").write_text(MY_LM + python_block_after(README.read_text(), "### Adding a backbone"))
    (main / "my_sweep.yaml").write_text("kind: grid\nstudy_name: my_sweep\nmetric: val/acc\n"
                                        "base: {trainer: {max_steps: 2}}\ngrid:\n  model.norm: [scale_only, bn]\n")
    # the study `normablate report --study quick` reads: 4 instant fake trials of that name (the README's quick
    # sweep itself is 18 trials; the report command is what is tested here)
    (base / "quick_tiny.yaml").write_text("kind: grid\nstudy_name: quick\nmetric: val/acc\n"
                                          "trainer_fn: normablate.sweep.dryrun:train\n"
                                          "base: {trainer: {max_steps: 10, val_every: 5}}\n"
                                          "grid: {seed: [0, 1], model.norm: [bn, none]}\n")
    run_bounded([str(Path(sys.executable).parent / "normablate"), "sweep", "--config", str(base / "quick_tiny.yaml"),
                 "--no-report"], cwd=main, env=shell_env(), check=True, capture_output=True, timeout=600)
    return main


def shell_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's normablate
    env["NORMABLATE_CACHE"] = env.get("NORMABLATE_CACHE", str(Path.home() / ".cache" / "normablate"))
    return env


@pytest.mark.slow  # ~20 commands, each a fresh process that imports torch
def test_every_readme_command_runs_in_bash(workdir):
    run, _ = readme_commands()
    failures = []
    for no, cmd in run:
        sub = cmd.split()[cmd.split().index("normablate") + 1]
        assert sub in FLAG, f"README line {no}: no rule for 'normablate {sub}' in this test: {cmd}"
        full = cmd if FLAG[sub] is None else f"{cmd} {FLAG[sub]}"
        p = run_bounded(["bash", "-c", full], cwd=workdir, env=shell_env(), capture_output=True, text=True,
                        timeout=300)
        if p.returncode != 0:
            failures.append(f"README line {no}: `{full}` exited {p.returncode}: {p.stderr.strip()[-400:]}")
    assert not failures, "\n".join(failures)

"""What one training run returns (and what a sweep stores per trial)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunResult:
    run_dir: str  # lightning_logs/<experiment>/<run>/
    status: str  # "completed" | "diverged" | "interrupted"
    steps: int  # optimizer steps taken
    final: dict[str, float] = field(default_factory=dict)  # last validation metrics (val/loss, val/acc|val/ppl, ...)
    best: dict[str, float] = field(default_factory=dict)  # best value of each validation metric over the run
    diverged_step: int | None = None  # step at which the run was stopped as diverged
    steps_to_target: int | None = None  # first validation step where trainer.target_metric reached its value
    time_to_target: float | None = None  # wall-clock seconds of training until then
    train_loss_auc: float | None = None  # mean training loss over the run (area under the curve / steps)
    wall_time: float = 0.0  # seconds for the whole run
    throughput: float = 0.0  # training samples (vision) or tokens (LM) per second
    # CPU seconds of the training process (all threads; rank 0's under DDP), summed over resumes; None when the run
    # was resumed from a checkpoint written before this was recorded
    cpu_time: float | None = None
    versions: dict[str, str] = field(default_factory=dict)  # libraries, git commit, CPU model (as versions.json)
    history: dict[str, list[list[float]]] = field(default_factory=dict)  # metric -> [[step, value], ...]
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config (to_dict form)
    probes: dict[str, float] = field(default_factory=dict)  # probes on: mean of each "probe/..." series over the run
    # The test split, evaluated once at the end (never used to choose anything): metrics of the final model
    # ("test/loss", "test/acc" | "test/ppl"), and of the best-validation weights (selection's pick:
    # trainer.select_metric) when those are not the final ones (else empty). Diverged runs: the model as it stopped;
    # interrupted runs: empty until they complete.
    test: dict[str, float] = field(default_factory=dict)
    test_at_best: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None  # the validation step whose weights are the best by trainer.select_metric
    num_classes: int | None = None  # classification: the data's number of classes (a report's "at chance" rule)

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["diverged"] = self.diverged
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, default=float))

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

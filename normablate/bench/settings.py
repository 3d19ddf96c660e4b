"""The sizes and repeats of one bench run (``Settings``) and what a run collects (``Report``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import sections
from .timing import Row


@dataclass
class Settings:
    """Sizes and repeats of one bench run (``quick`` < 1 min; ``tiny`` only for the tests)."""

    image: tuple[int, int, int, int] = (64, 64, 32, 32)  # (N, C, H, W)
    tokens: tuple[int, int, int] = (32, 256, 384)  # (N, T, C)
    pad_fraction: float = 0.2  # masked norms: share of padded tokens
    repeats: int = 25
    steps: int = 20  # framework: training steps per run (the first few are warm-up)
    runs: int = 2  # framework: interleaved runs per side
    infer_batch: int = 256
    startup_runs: int = 5
    backbones: tuple[str, ...] = ("resnet20", "vit", "transformer_lm")
    # the sections to run: every registered section but the opt-in ones (sweep)
    sections: tuple[str, ...] = field(default_factory=sections.defaults)
    data_steps: int = 20  # data: training steps per config (the first few are warm-up)
    cifar10: str = field(default_factory=lambda: os.environ.get("NORMABLATE_BENCH_CIFAR10", "cifar10"))
    # sweep: the quick sweep (configs/sweeps/quick.yaml) on part of its grid (None: the spec's own values), so that
    # both sides run twice in minutes on a loaded 2-core machine; every trial is one of the quick sweep's trials
    # but for ``sweep_overrides``
    sweep_seeds: tuple[int, ...] = (0,)
    sweep_lrs: tuple[float, ...] | None = (0.003, 0.01)
    sweep_norms: tuple[str, ...] | None = ("bn", "ln")
    sweep_rounds: int = 2  # runs per side, interleaved A B B A
    sweep_overrides: tuple[str, ...] = ("trainer.max_steps=50",)  # key=value for every trial (one validation)
    compile: bool = False
    norms: tuple[str, ...] | None = None  # norm rows for these names only (None: every registered norm)
    tiny_models: bool = False  # framework: tiny backbones (quick and test runs)
    tiny: bool = False  # the tests' sizes: startup times --version only, no first-step process
    model_studies: tuple[str, ...] = ("santurkar_vgg", "vit_norms", "lm_norms")  # models: configs/studies/<name>.yaml
    model_repeats: int = 20  # models: interleaved steps per variant (after 2 warm-up steps)
    vit_batches: tuple[int, int] = (128, 1)  # vit_inference: the two batch sizes (study batch, one image)
    vit_repeats: int = 30  # vit_inference: interleaved repeats per variant and batch
    vit_inner_b1: int = 20  # vit_inference: calls per timed repeat at the second batch (a single image is ~1 ms)

    @classmethod
    def make(cls, quick: bool = False, tiny: bool = False, compile: bool = False) -> Settings:
        if tiny:
            return cls(image=(4, 8, 4, 4), tokens=(2, 8, 16), repeats=2, steps=3, runs=1, infer_batch=4,
                       startup_runs=1, backbones=("resnet20", "transformer_lm"), compile=compile, tiny_models=True,
                       tiny=True, data_steps=4, cifar10="synthetic", sweep_rounds=1, sweep_lrs=(0.001, 0.003),
                       sweep_norms=("bn",), sweep_overrides=("trainer.max_steps=4", "trainer.val_every=2"),
                       model_repeats=2, vit_batches=(4, 1), vit_repeats=2, vit_inner_b1=1)
        if quick:
            return cls(image=(32, 32, 16, 16), tokens=(16, 128, 192), repeats=7, steps=12, runs=1,
                       infer_batch=64, startup_runs=2, compile=compile, tiny_models=True, data_steps=8,
                       sweep_rounds=1, model_repeats=3, vit_repeats=7, vit_inner_b1=5)
        return cls(compile=compile)


@dataclass
class Report:
    settings: Settings
    command: str
    rows: list[Row] = field(default_factory=list)

"""The bench's goals, as data (issues 11 and 29): which rows a goal reads and the limit it sets. ``report.py``
evaluates them; why a goal is not met (profiler and import-time notes) is written in docs/benchmark_notes.md, under
``## why not: KEY`` (the keys are named below), and quoted after the goal line."""
from __future__ import annotations

# (section, name, layout, reference label or "" for any, limit on the ratio, goal); why-not key: "NAME LAYOUT"
GOALS = [
    ("norms", "bn", "tokens", "", 1.05, "bn tokens at BatchNorm1d-on-(N*T, C) speed"),
    ("norms", "rms", "tokens", "ln (ours)", 1.0, "rms <= ln (tokens)"),
    ("norms", "rms", "image", "ln (ours)", 1.0, "rms <= ln (image)"),
    ("norms", "ln", "image", "", 1.05, "ln image within 1.05x of nn.LayerNorm on channels-last x"),
    ("framework", "resnet20", "", "", 1.03, "train() <= 1.03x a hand loop (ResNet-20)"),
    ("framework", "vit", "", "", 1.03, "train() <= 1.03x a hand loop (ViT)"),
    ("framework", "transformer_lm", "", "", 1.03, "train() <= 1.03x a hand loop (LM)"),
]

# (name, layout, reference label, limit, goal): the goals again with torch.compile as the opt-in path (--compile)
COMPILED_GOALS = [
    ("rms", "tokens", "ln (ours) compiled", 1.0, "rms compiled <= ln compiled (tokens)"),
    ("rms", "tokens", "ln (ours) eager", 1.0, "rms compiled <= ln eager, the fastest LN here (tokens)"),
]

# startup rows: (row name, limit in seconds, why-not key or None)
STARTUP_GOALS = [
    ("normablate --help", 1.5, None),
    ("normablate --version", 1.5, None),
    ("normablate list", 1.5, "list"),
    ("process start -> first training step", 2.5, "startup"),
]

# issue 29: every study variant's step <= this x its study's reference variant at the same settings;
# why-not key: the start of the models row's name ("vit_norms: norm=dyt")
MODEL_STEP_LIMIT = 1.10
# issue 29: the Transformer studies' steps reach this share of the matmul peak; why-not key "transformer peak"
TRANSFORMER_STUDIES = ("vit_norms", "lm_norms")
TRANSFORMER_PEAK_SHARE = 0.65

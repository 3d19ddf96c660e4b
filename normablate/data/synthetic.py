"""Embedded procedural datasets (no network, no files): ``source: synthetic``.

Contract: a pure function of a fixed seed, so every run, machine and test sees the same data.

``images(n, seed)`` -> ``(x uint8 (n, 3, 32, 32), y int64 (n,))``, 10 exactly balanced classes, each a pattern
family whose class identity survives the standard CIFAR augmentation (4-pixel shifts, horizontal flips):

    0 horizontal stripes   1 vertical stripes    2 checkerboard      3 concentric rings   4 one large blob
    5 scattered dots       6 diagonal cross-hatch 7 radial spokes    8 square             9 plus sign

Every image also gets a weaker distractor pattern of another class, low-frequency background clutter, a random
colour direction, a per-image contrast drawn log-uniformly over a factor of ~12, a brightness offset, and pixel
noise. So per-image statistics vary a lot (what BN/LN/GN normalize away), colour carries no label, and a small
CNN learns it quickly but stays far from 100%.

``text(seed)`` -> str, ~1.5 MB of paragraphs separated by blank lines, from a small probabilistic grammar:
sentences (names, verbs, objects, numbers), arithmetic (``12+7=19``, ``(3+4)*2=14``), balanced brackets,
``key: value`` records, counting runs and dialogue lines. Paragraph lengths vary from a few bytes to a few hundred,
so ``mode: samples`` gives variable lengths with plenty of padding, and the structure is learnable (digits of
sums, bracket closing, repeated names).
"""
from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import torch

NUM_CLASSES = 10
CLASS_NAMES = ["hstripes", "vstripes", "checker", "rings", "blob", "dots", "crosshatch", "spokes", "square",
               "plus"]
# Cache keys include a hash of this file, so an edit to a generator never reuses stale cached tensors.
CODE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
IMAGE_SEED = 20240601  # the embedded dataset is fixed; the run seed only orders and augments it
TEXT_SEED = 20240602
TRAIN_SIZE, VAL_SIZE = 20_000, 2_000


# ------------------------------------------------------------------------------------------ images
def _pattern(c: int, u: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Class-``c`` patterns in [-1, 1] for a chunk of images; ``u, v`` are (n, H, W) coordinates in [-1, 1]."""
    n = u.shape[0]

    def rnd(lo: float, hi: float) -> torch.Tensor:  # (n, 1, 1) uniform
        return (lo + (hi - lo) * torch.rand(n, 1, 1, generator=g))

    cx, cy = rnd(-0.35, 0.35), rnd(-0.35, 0.35)
    du, dv = u - cx, v - cy
    phase = rnd(0, 2 * math.pi)
    if c in (0, 1):  # stripes: orientation within 15 degrees of horizontal / vertical
        th = rnd(-0.26, 0.26) + (0 if c == 0 else math.pi / 2)
        return torch.sin(math.pi * rnd(2, 4.5) * (v * torch.cos(th) + u * torch.sin(th)) + phase)
    if c == 2:  # checkerboard, slightly rotated, sharpened
        th, f = rnd(-0.26, 0.26), math.pi * rnd(2, 4)
        a, b = u * torch.cos(th) - v * torch.sin(th), u * torch.sin(th) + v * torch.cos(th)
        return torch.tanh(3 * torch.sin(f * a + phase) * torch.sin(f * b + rnd(0, 2 * math.pi)))
    r = torch.sqrt(du**2 + dv**2)
    if c == 3:  # rings
        return torch.sin(math.pi * rnd(2.5, 5) * r + phase)
    if c == 4:  # one large blob
        return 2 * torch.exp(-(r**2) / (2 * rnd(0.2, 0.45) ** 2)) - 1
    if c == 5:  # 6-12 small dots
        k = 12
        px, py = torch.rand(n, k, 1, 1, generator=g) * 1.8 - 0.9, torch.rand(n, k, 1, 1, generator=g) * 1.8 - 0.9
        on = (torch.arange(k).view(1, k, 1, 1) < torch.randint(6, k + 1, (n, 1, 1, 1), generator=g)).float()
        d2 = (u[:, None] - px) ** 2 + (v[:, None] - py) ** 2
        return 2 * (on * torch.exp(-d2 / (2 * 0.07**2))).amax(1) - 1
    if c == 6:  # diagonal cross-hatch (both diagonals: symmetric under flips)
        f = math.pi * rnd(2, 4) / math.sqrt(2)
        return 0.5 * (torch.sin(f * (u + v) + phase) + torch.sin(f * (u - v) + rnd(0, 2 * math.pi)))
    if c == 7:  # radial spokes around a centre
        k = torch.randint(4, 8, (n, 1, 1), generator=g).float()
        return torch.sin(k * torch.atan2(dv, du) + phase) * (1 - torch.exp(-(r**2) / 0.02))
    if c == 8:  # filled square with soft edges
        s = rnd(0.25, 0.5)
        return torch.tanh(8 * (s - torch.maximum(du.abs(), dv.abs())))
    if c == 9:  # plus sign
        s, w = rnd(0.4, 0.8), rnd(0.08, 0.16)
        bar_h = (dv.abs() < w) & (du.abs() < s)
        bar_v = (du.abs() < w) & (dv.abs() < s)
        return 2 * (bar_h | bar_v).float() - 1
    raise ValueError(c)


def _chunk(labels: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    n = labels.shape[0]
    lin = torch.linspace(-1, 1, size)
    v, u = torch.meshgrid(lin, lin, indexing="ij")
    u, v = u.expand(n, size, size), v.expand(n, size, size)  # (n, H, W)
    main = torch.empty(n, size, size)
    other = torch.empty(n, size, size)
    distract = (labels + torch.randint(1, NUM_CLASSES, (n,), generator=g)) % NUM_CLASSES
    for c in range(NUM_CLASSES):
        for dst, lab in ((main, labels), (other, distract)):
            sel = (lab == c).nonzero().squeeze(1)
            if len(sel):
                dst[sel] = _pattern(c, u[sel], v[sel], g)
    # low-frequency clutter: 4x4 noise upsampled
    clutter = torch.nn.functional.interpolate(torch.randn(n, 1, 4, 4, generator=g), size=(size, size),
                                              mode="bicubic", align_corners=False)[:, 0]
    w_other = torch.rand(n, 1, 1, generator=g) * 0.7  # distractor strength, up to 0.7 of the main pattern
    w_clut = torch.rand(n, 1, 1, generator=g) * 0.6
    signal = (main + w_other * other + w_clut * clutter) / (1 + w_other + w_clut)  # (n, H, W), ~[-1, 1]
    # colour: a random direction in RGB (sign included), so colour says nothing about the class
    colour = torch.randn(n, 3, 1, 1, generator=g)
    colour = colour / colour.norm(dim=1, keepdim=True)
    contrast = torch.exp(torch.empty(n, 1, 1, 1).uniform_(math.log(0.06), math.log(0.7), generator=g))
    brightness = 0.15 + 0.7 * torch.rand(n, 1, 1, 1, generator=g) + 0.1 * torch.randn(n, 3, 1, 1, generator=g)
    noise = torch.rand(n, 1, 1, 1, generator=g) * 0.08 * torch.randn(n, 3, size, size, generator=g)
    img = brightness + contrast * colour * signal[:, None] + noise  # (n, 3, H, W) in ~[0, 1]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def images(n: int, seed: int = IMAGE_SEED, size: int = 32, chunk: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images and labels, exactly balanced (``n % 10`` extra go to the first classes), shuffled."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=g)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is as fast, and 10x faster on a busy machine
    try:
        x = torch.cat([_chunk(labels[i:i + chunk], g, size) for i in range(0, n, chunk)])
    finally:
        torch.set_num_threads(threads)
    return x, labels


def image_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The embedded "train" and "test" splits (different seeds, so no image is shared)."""
    return {"train": images(TRAIN_SIZE, IMAGE_SEED), "test": images(VAL_SIZE, IMAGE_SEED + 1)}


# ------------------------------------------------------------------------------------------ text
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar",
         "peggy", "trent", "victor", "walter"]
VERBS = [("gave", "to"), ("sold", "to"), ("sent", "to"), ("threw", "at"), ("showed", "to"), ("lent", "to")]
OBJECTS = ["apple", "book", "coin", "lamp", "letter", "stone", "cup", "key", "map", "ring"]
CITIES = ["paris", "lima", "oslo", "cairo", "tokyo", "quito", "rome", "dakar"]
ADJ = ["red", "old", "small", "heavy", "bright", "quiet", "broken", "new"]
BRACKETS = ["()", "[]", "{}", "<>"]


def _sentence(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    verb, prep = r.choice(VERBS)
    k = r.randint(1, 12)
    obj = r.choice(OBJECTS) + ("s" if k > 1 else "")
    adj = r.choice(ADJ) + " " if r.random() < 0.4 else ""
    s = f"{a} {verb} {k} {adj}{obj} {prep} {b}"
    if r.random() < 0.3:
        s += f" in {r.choice(CITIES)}"
    return s + "."


def _arith(r: random.Random) -> str:
    a, b = r.randint(0, 99), r.randint(0, 99)
    kind = r.random()
    if kind < 0.45:
        return f"{a}+{b}={a + b}"
    if kind < 0.7:
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}={a - b}"
    if kind < 0.85:
        a, b = r.randint(0, 12), r.randint(0, 12)
        return f"{a}*{b}={a * b}"
    c = r.randint(1, 9)
    return f"({a % 10}+{b % 10})*{c}={(a % 10 + b % 10) * c}"


def _brackets(r: random.Random, depth: int = 0) -> str:
    out = []
    for _ in range(r.randint(1, 3)):
        o, c = r.choice(BRACKETS)
        inner = _brackets(r, depth + 1) if depth < 4 and r.random() < 0.6 else r.choice("abcxyz")
        out.append(o + inner + c)
    return "".join(out)


def _record(r: random.Random) -> str:
    name = r.choice(NAMES)
    return f"name: {name}; age: {r.randint(18, 90)}; city: {r.choice(CITIES)}; id: {name[:3]}{r.randint(100, 999)}"


def _count(r: random.Random) -> str:
    start, step = r.randint(0, 50), r.choice([1, 2, 3, 5, 10])
    return " ".join(str(start + i * step) for i in range(r.randint(3, 12)))


def _dialogue(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    lines = [f"{a.upper()}: where is the {r.choice(OBJECTS)}, {b}?"]
    for _ in range(r.randint(0, 3)):
        who = r.choice([a, b])
        lines.append(f"{who.upper()}: {_sentence(r)}")
    return "\n".join(lines)


LINE_KINDS = [(_sentence, 0.3), (_arith, 0.25), (_brackets, 0.12), (_record, 0.12), (_count, 0.11),
              (_dialogue, 0.10)]


def _paragraph(r: random.Random) -> str:
    fn = r.choices([f for f, _ in LINE_KINDS], weights=[w for _, w in LINE_KINDS])[0]
    n = min(int(r.expovariate(1 / 2.5)) + 1, 12)  # lines per paragraph: 1 (often) to 12 (rarely)
    return "\n".join(fn(r) for _ in range(n))


def text(seed: int = TEXT_SEED, num_bytes: int = 1_500_000) -> str:
    """The embedded corpus: paragraphs joined by blank lines, about ``num_bytes`` long (ASCII)."""
    r = random.Random(seed)
    parts, total = [], 0
    while total < num_bytes:
        p = _paragraph(r)
        parts.append(p)
        total += len(p) + 2
    return "\n\n".join(parts) + "\n"

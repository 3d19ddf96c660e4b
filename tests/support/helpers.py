"""Small helpers more than one test file needs (one definition each)."""
from __future__ import annotations

import io
import socket

import numpy as np
import torch


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(arr: np.ndarray) -> bytes:
    """``arr`` (H, W, 3 uint8) encoded as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def dm_for(cfg, task: str = "classification", seed: int = 0):
    """The DataModule of ``cfg`` (a DataConfig) for ``task``, set up."""
    from normablate.data import build_datamodule

    dm = build_datamodule(cfg, task, seed)
    dm.setup()
    return dm


def padded(seed: int = 0, n: int = 4, t: int = 7, c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 tokens (n, t, c) and a padding mask with real lengths 7, 3, 5, 1 (the first n of them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, c, generator=g, dtype=torch.float64) * 2 + 0.5
    lengths = torch.tensor([7, 3, 5, 1])[:n]
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return x, mask


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``normablate argv`` in this process: (exit code, stdout, stderr). A traceback fails the test (no catch-all)."""
    from normablate.cli import main

    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def lm_padding_pair():
    """The same 4 byte sequences (lengths 9, 4, 12, 6) padded two ways: to 12 with pad id 0, and to 16 with pad
    ids 7 and 99. Returns (idx12, mask12, idx16, mask16): a model's real-token outputs must not tell them apart."""
    lengths = torch.tensor([9, 4, 12, 6])
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (4, 12), generator=g)
    mask12 = torch.arange(12)[None] < lengths[:, None]
    idx12 = tokens.masked_fill(~mask12, 0)
    idx16 = torch.cat([tokens.masked_fill(~mask12, 7), torch.full((4, 4), 99)], dim=1)
    mask16 = torch.cat([mask12, torch.zeros(4, 4, dtype=torch.bool)], dim=1)
    return idx12, mask12, idx16, mask16

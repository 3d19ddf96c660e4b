"""normablate.dotted: the one reader and writer of dotted config keys."""
from __future__ import annotations

from normablate.dotted import get_dotted, set_dotted


def test_get_and_set_dotted():
    d = {"optim": {"lr": 0.1}, "model": "resnet20"}
    assert get_dotted(d, "optim.lr") == 0.1
    assert get_dotted(d, "optim.momentum") is None and get_dotted(d, "optim.momentum", 0.9) == 0.9
    assert get_dotted(d, "model.norm", "x") == "x"  # a non-mapping on the way: the default
    set_dotted(d, "optim.momentum", 0.5)
    set_dotted(d, "model.norm", "bn")  # replaces the non-mapping level
    set_dotted(d, "seed", 3)
    assert d == {"optim": {"lr": 0.1, "momentum": 0.5}, "model": {"norm": "bn"}, "seed": 3}

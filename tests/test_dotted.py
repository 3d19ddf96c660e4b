"""normablate.dotted: the one reader and writer of dotted config keys."""
from __future__ import annotations

import json

from normablate.dotted import flatten, get_dotted, set_dotted


def test_get_and_set_dotted():
    d = {"optim": {"lr": 0.1}, "model": "resnet20"}
    assert get_dotted(d, "optim.lr") == 0.1
    assert get_dotted(d, "optim.momentum") is None and get_dotted(d, "optim.momentum", 0.9) == 0.9
    assert get_dotted(d, "model.norm", "x") == "x"  # a non-mapping on the way: the default
    set_dotted(d, "optim.momentum", 0.5)
    set_dotted(d, "model.norm", "bn")  # replaces the non-mapping level
    set_dotted(d, "seed", 3)
    assert d == {"optim": {"lr": 0.1, "momentum": 0.5}, "model": {"norm": "bn"}, "seed": 3}


def test_flatten_opens_the_mappings_descend_names_and_inverts_set_dotted():
    d = {"model": {"norm": {"name": "gn", "groups": 4}, "width": 8}, "optim": {"lr": 0.1}, "seed": 0, "tags": {}}
    assert flatten(d) == {"model.norm.name": "gn", "model.norm.groups": 4, "model.width": 8, "optim.lr": 0.1,
                          "seed": 0}  # an empty mapping leaves no key
    assert flatten(d, descend=lambda key: key in ("model", "optim")) == {
        "model.norm": {"name": "gn", "groups": 4}, "model.width": 8, "optim.lr": 0.1, "seed": 0, "tags": {}}
    back: dict = {}
    for k, v in flatten(d).items():
        set_dotted(back, k, v)
    assert back == {k: v for k, v in d.items() if k != "tags"}


def _old_train_flat(d, prefix=""):  # train._flat before it used dotted.flatten
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "norm":
            out.update(_old_train_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def _old_runfolder_flat(d):  # runfolder._flat before it used dotted.flatten
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "data", "optim", "trainer", "probes"):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def test_the_two_flatteners_on_dotted_flatten_give_what_they_gave():
    from normablate import runfolder, train
    from normablate.config import RunConfig, to_dict

    cfg = to_dict(RunConfig())
    cfg["model"]["norm"] = {"name": "gn", "groups": 4}
    cfg["trainer"]["extra"] = {"a": {"b": [1, 2]}, "norm": {"c": 1}}  # deeper levels: opened by one, kept by other
    assert train._flat(cfg) == _old_train_flat(cfg) and list(train._flat(cfg)) == list(_old_train_flat(cfg))
    assert runfolder._flat(cfg) == _old_runfolder_flat(cfg)
    assert list(runfolder._flat(cfg)) == list(_old_runfolder_flat(cfg))

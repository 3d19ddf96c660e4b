"""normablate.plugins.import_object: the one 'package.module:attr' import (norms, backbones, study kinds and a
sweep's trainer_fn go through it), and errors.did_you_mean, the one 'did you mean' suffix."""
from __future__ import annotations

import pytest

from normablate import norms
from normablate.errors import ConfigError, did_you_mean, unknown
from normablate.plugins import import_object


def test_import_object_finds_module_attributes_and_dotted_attributes():
    import os.path

    assert import_object("os.path:join") is os.path.join
    assert import_object("normablate.signals:StopRequest.__call__").__name__ == "__call__"


@pytest.mark.parametrize("path, message", [
    ("os.path", r"trainer_fn 'os.path' must be 'package.module:name'"),
    ("os.path:", "must be 'package.module:name'"),
    ("no_such_module_xyz:f", r"trainer_fn 'no_such_module_xyz:f': cannot import module 'no_such_module_xyz'"),
    ("os.path:nope", r"trainer_fn 'os.path:nope': module 'os.path' has no attribute 'nope'"),
])
def test_import_object_errors_name_the_key_and_the_part_that_failed(path, message):
    with pytest.raises(ConfigError, match=message):
        import_object(path, "trainer_fn")


def test_a_registry_import_path_goes_through_import_object():
    assert norms.REGISTRY.get("torch.nn:LayerNorm").__name__ == "LayerNorm"
    with pytest.raises(ConfigError, match="has no attribute 'Nope'"):
        norms.REGISTRY.get("torch.nn:Nope")


def test_did_you_mean():
    assert did_you_mean("medain", ["median", "none"]) == " (did you mean 'median'?)"
    assert did_you_mean("zzz", ["median", "none"]) == ""
    assert did_you_mean("lrr", ["lr"], lambda h: "optim." + h) == " (did you mean optim.lr?)"
    assert str(unknown("norm", "lnn", ["ln", "bn"])) == "unknown norm 'lnn'; valid: bn, ln (did you mean 'ln'?)"

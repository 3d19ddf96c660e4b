"""normablate.sweep.spec's typed loader: the spec's common keys are a dataclass (SpecKeys) checked by the run
config's own checker (config.build_section); every error names the key and what is allowed."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from normablate.errors import ConfigError
from normablate.sweep.spec import COMMON_KEYS, SpecKeys, load_spec

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"kind": "grid", "study_name": "t", "base": str(ROOT / "configs" / "runs" / "quick_synthetic.yaml"),
        "grid": {"model.norm": ["bn", "ln"]}, "overrides": {"trainer.max_steps": 4}}


def spec(**change):
    d = copy.deepcopy(SPEC)
    d.update(change)
    return d


def test_the_common_keys_are_the_typed_fields():
    assert COMMON_KEYS[:3] == ("kind", "base", "study_name") and set(COMMON_KEYS) == set(SpecKeys.__dataclass_fields__)
    s = load_spec(spec(heartbeat={"interval": 5, "grace": 60}, direction="minimize", metric="val/loss"))
    assert s.heartbeat == {"interval": 5.0, "grace": 60.0, "max_retry": 3}
    assert (s.metric, s.direction, s.metric_at) == ("val/loss", "minimize", "final")


@pytest.mark.parametrize("change, message", [
    ({"overrides": [1]}, r"sweep spec: config key overrides=\[1\] has the wrong type; expected dict or null"),
    ({"direction": "up"}, r"config key direction='up' has the wrong type; expected one of 'maximize', 'minimize'"),
    ({"metric_at": "bset"}, r"metric_at='bset' is not allowed; valid: final, best \(did you mean 'best'\?\)"),
    ({"base": 3}, r"config key base=3 has the wrong type; expected str or dict"),
    ({"heartbeat": {"grase": 5}}, r"unknown config key 'heartbeat.grase'; valid keys in heartbeat: interval, grace, "
                                  r"max_retry \(did you mean heartbeat.grace\?\)"),
    ({"heartbeat": {"max_retry": 1.5}}, r"heartbeat.max_retry=1.5 has the wrong type; expected int"),
    ({"heartbeat": {"grace": 5}}, r"heartbeat.grace \(5.0\) must exceed heartbeat.interval \(10\)"),
    ({"grdi": {}}, r"unknown key 'grdi' in sweep spec; valid: kind, base, .* \(did you mean 'grid'\?\)"),
    ({"trainer_fn": "pkg.fn"}, r"trainer_fn='pkg.fn' must be 'package.module:function'"),
])
def test_bad_common_keys_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(spec(**change))


@pytest.mark.parametrize("change, named", [
    ({"grid": {"model.backbone": ["resnet20", "transformer_lm"]}}, r"grid point \[backbone=transformer_lm\]: .*"
                                                                    r"set by model.backbone"),
    ({"grid": {"task": ["classification", "lm"]}}, r"grid point \[task=lm\]: .*set by task"),
    ({"overrides": {"model.backbone": "transformer_lm"}}, r"grid point \[norm=bn\]: .*set by model.backbone"),
])
def test_a_trial_of_another_task_than_the_studys_is_refused(change, named):
    base = {"model": {"backbone": "resnet20", "norm": "bn"}, "data": {"source": "synthetic"}}
    with pytest.raises(ConfigError, match=named + r"; a study runs one task") as e:
        load_spec(spec(base=base, **change))
    assert "its trial's task 'lm' differs from the study's 'classification' (its base config's)" in str(e.value)

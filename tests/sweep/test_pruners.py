"""normablate.sweep.pruners: a spec's pruner name -> Optuna's own class, its keys -> that class's arguments."""
from __future__ import annotations

import optuna
import pytest

from normablate.errors import ConfigError
from normablate.sweep.pruners import PRUNERS, check_pruner, make_pruner


NEEDS = {"percentile": {"percentile": 25.0}, "threshold": {"upper": 10.0}}  # arguments without a default


@pytest.mark.parametrize("name", list(PRUNERS))
def test_every_name_builds_the_optuna_class_it_names(name):
    pruner = make_pruner(check_pruner({"name": name, **NEEDS.get(name, {})}, "spec"), max_steps=100)
    assert type(pruner) is getattr(optuna.pruners, PRUNERS[name])
    assert isinstance(pruner, optuna.pruners.BasePruner)


def test_keys_are_the_class_arguments_and_hyperband_defaults_to_the_run_budget():
    p = make_pruner({"name": "median", "n_startup_trials": 7, "n_warmup_steps": 30}, max_steps=100)
    assert (p._n_startup_trials, p._n_warmup_steps) == (7, 30)
    assert make_pruner({"name": "hyperband"}, max_steps=400)._max_resource == 400
    assert make_pruner({"name": "hyperband"}, max_steps=None)._max_resource == "auto"  # budget in epochs
    assert make_pruner({"name": "hyperband", "max_resource": 50}, max_steps=400)._max_resource == 50


def test_bad_pruners_are_refused_naming_the_name_or_the_argument():
    with pytest.raises(ConfigError, match=r"spec: pruner 'medain' is not known; valid: none, median, .*did you mean "
                                          r"'median'"):
        check_pruner({"name": "medain"}, "spec")
    with pytest.raises(ConfigError, match="pruner \\['x'\\] is not known"):
        check_pruner({"name": ["x"]}, "spec")
    with pytest.raises(ConfigError, match="n_warmup"):
        check_pruner({"name": "median", "n_warmup": 3}, "spec")
    assert check_pruner(None, "spec") == {"name": "none"} and check_pruner("median", "spec") == {"name": "median"}


@pytest.mark.parametrize("p, says", [({"name": "percentile", "percentile": 150}, "percentile=150"),
                                     ({"name": "median", "n_startup_trials": -1}, "n_startup_trials=-1")])
def test_a_value_optuna_refuses_is_a_config_error_naming_the_pruner_and_optunas_message(p, says):
    with pytest.raises(ConfigError, match=rf"spec: pruner .*'{p['name']}'.*: .*{says}"):
        check_pruner(p, "spec")


def test_make_pruner_refuses_an_unknown_name_listing_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown pruner 'medain'; valid: hyperband, median, none, .*"
                                          r"did you mean 'median'"):
        make_pruner({"name": "medain"}, max_steps=100)

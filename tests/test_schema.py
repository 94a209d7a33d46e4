"""normkit.schema: the typed config getters and the unknown-key check, on hand-written sections."""
import math

import pytest

from normkit.schema import check_keys, config_bool, config_float, config_int, config_mapping


def test_config_int():
    assert config_int({"n": 1e3}, "n", 5, "train") == 1000 and type(config_int({"n": 1e3}, "n", 5, "train")) is int
    assert config_int({}, "n", 5, "train") == 5
    assert config_int({"n": 0}, "n", 5, "train", minimum=0) == 0  # the minimum itself is allowed
    assert config_int({}, "n", None, "train") is None and config_int({"n": None}, "n", None, "train") is None
    for bad in (2.9, True, "4", math.inf, math.nan):
        with pytest.raises(ValueError, match=r"train.n must be an integer, got "):
            config_int({"n": bad}, "n", 5, "train")
    with pytest.raises(ValueError, match=r"train.n must be an integer, got None"):
        config_int({"n": None}, "n", 5, "train")  # null only where it is the default
    with pytest.raises(ValueError, match=r"train.n must be >= 1, got 0"):
        config_int({"n": 0}, "n", 5, "train", minimum=1)


def test_config_float():
    assert config_float({"lr": 1}, "lr", 0.1, "opt") == 1.0 and config_float({}, "lr", 0.1, "opt") == 0.1
    assert config_float({"lr": 0.0}, "lr", 0.1, "opt", minimum=0.0) == 0.0
    for bad in (True, "0.1", math.inf, math.nan, None):
        with pytest.raises(ValueError, match=r"opt.lr must be a finite number"):
            config_float({"lr": bad}, "lr", 0.1, "opt")
    with pytest.raises(ValueError, match=r"opt.lr must be > 0, got 0.0"):
        config_float({"lr": 0.0}, "lr", 0.1, "opt", positive=True)
    with pytest.raises(ValueError, match=r"opt.lr must be >= 0.5, got 0.25"):
        config_float({"lr": 0.25}, "lr", 0.1, "opt", minimum=0.5)


def test_config_bool_and_mapping():
    assert config_bool({"x": False}, "x", True, "t") is False and config_bool({}, "x", True, "t") is True
    for bad in (1, 0, "false", None):
        with pytest.raises(ValueError, match=r"t.x must be true or false"):
            config_bool({"x": bad}, "x", True, "t")
    assert config_mapping({}, "m", "t") == {} and config_mapping({"m": None}, "m", "t") == {}
    assert config_mapping({"m": {"a": 1}}, "m", "t") == {"a": 1}
    for bad in ([], "", 0, [("a", 1)]):
        with pytest.raises(ValueError, match=r"t.m must be a mapping"):
            config_mapping({"m": bad}, "m", "t")


def test_check_keys_names_each_unknown_key_with_the_closest_one():
    check_keys({"mean": 1}, ["mean", "std"], "data")
    with pytest.raises(ValueError, match=r"unknown config keys data.meen \(did you mean data.mean\?\), data.zzz; "
                                         r"the keys of data are: mean, std"):
        check_keys({"meen": 1, "std": 2, "zzz": 3}, ["std", "mean"], "data")
    with pytest.raises(ValueError, match=r"unknown config key trian \(did you mean train\?\); the keys of the top "
                                         r"level are: data, train"):
        check_keys({"trian": {}}, ["train", "data"], "")

import pytest

from probegen import config
from probegen.errors import ProbegenError


@pytest.fixture
def params():
    return config.load_params(config.PARAMS)


def test_default_params_are_valid(params):
    assert config.num_probes(params) == 128
    assert config.zoo_names(params) == ["digits_inr", "digits_cnn"]
    assert config.method_names(params, "probe") == ["probegen", "vanilla", "synthetic"]
    assert config.method_names(params, "weights")[:2] == ["mlp", "statnn"]
    for zoo in ("digits_inr", "digits_cnn", "mnist_inr", "fmnist_inr", "cifar10_gs", "wild_park"):
        config.zoo_config(params, zoo)
        config.split_config(params, zoo)
        config.train_config(params, zoo)
    for method in config.method_names(params, "probe") + config.method_names(params, "weights"):
        config.method_config(params, method)


@pytest.mark.parametrize("value", [0, -3, 2.5, "64", True, None])
def test_num_probes_must_be_a_positive_integer(params, value):
    params["num_probes"] = value
    with pytest.raises(ProbegenError, match=r"num_probes: expected a positive integer"):
        config.num_probes(params)


def test_unknown_zoo_names_the_key(params):
    params["zoos"] = ["digits_inr", "imagenet_inr"]
    with pytest.raises(ProbegenError, match=r"zoos: unknown zoo 'imagenet_inr'"):
        config.zoo_names(params)
    with pytest.raises(ProbegenError, match=r"zoo.imagenet_inr: unknown zoo"):
        config.zoo_config(params, "imagenet_inr")


def test_unknown_method_and_wrong_kind(params):
    params["methods"]["probe"] = ["probegen", "probegenn"]
    with pytest.raises(ProbegenError, match=r"unknown method 'probegenn'"):
        config.method_names(params, "probe")
    params["methods"]["probe"] = ["mlp"]
    with pytest.raises(ProbegenError, match=r"'mlp' is a weights method"):
        config.method_names(params, "probe")


def test_bad_zoo_format_split_and_optimizer(params):
    params["zoo"]["mnist_inr"]["pack"]["format"] = "onnx"
    with pytest.raises(ProbegenError, match=r"zoo.mnist_inr.pack.format: expected one of"):
        config.zoo_config(params, "mnist_inr")
    params["split"]["digits_inr"].update(val=0.5, test=0.5)
    with pytest.raises(ProbegenError, match=r"val \+ test must be < 1"):
        config.split_config(params, "digits_inr")
    params["method"]["mlp"]["optimizer"] = "lbfgs"
    with pytest.raises(ProbegenError, match=r"method.mlp.optimizer"):
        config.method_config(params, "mlp")


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("num_probes: [1,\n")
    with pytest.raises(ProbegenError, match=r"params.yaml: not valid YAML"):
        config.load_params(bad)


# -------------------------------------------------------------- the wrong types of issue 13: one line each


@pytest.mark.parametrize("key, value, words", [
    ("method.probegen", "abc", r"method.probegen: expected a mapping of settings, got 'abc'"),
    ("train.digits_inr", 5, r"train.digits_inr: expected a mapping of settings, got 5"),
    ("split.digits_inr.seed", "zero", r"split.digits_inr.seed: expected an integer, got 'zero'"),
    ("dead_leaves.seed", "0", r"dead_leaves.seed: expected an integer, got '0'"),
    ("num_probes", 10_000_000, r"num_probes: expected a positive integer \(at most 65536\)"),
    ("method.mlp.lr", float("inf"), r"method.mlp.lr: expected a positive number"),
    ("method.mlp.hidden", "wide", r"method.mlp.hidden: expected a non-negative integer, got 'wide'"),
    ("method.mlp.standardize", "yes", r"method.mlp.standardize: expected true or false"),
    ("seeds", [0, 0], r"seeds: \[0, 0\] repeats a seed"),
    ("zoos", ["digits_inr", "digits_inr"], r"zoos: 'digits_inr' is listed twice"),
    ("checkpoint.every_steps", -1, r"checkpoint.every_steps: expected an integer >= 0"),
    ("zoo.digits_inr.pack.label_file", 3, r"zoo.digits_inr.pack.label_file: expected a split file URL"),
    ("zoo.digits_cnn.pack.label_file", "x.json", r"zoo.digits_cnn.pack.label_file:.*dwsnets_inr zoos only"),
    ("localize.top_probes", 1, r"localize.top_probes: expected an integer >= 2"),
])
def test_check_params_names_the_bad_key_in_one_line(params, key, value, words):
    node = params
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    with pytest.raises(ProbegenError, match=words) as err:
        config.check_params(params)
    assert "\n" not in str(err.value)


def test_check_params_accepts_the_defaults_and_notes_pairs_that_do_not_apply(params):
    notes = config.check_params(params)
    assert notes == ["dwsnets on digits_cnn: skipped (" + config_reason("dwsnets", "small_cnn") + ")"]


def config_reason(method, family):
    from probegen.methods import METHODS
    return METHODS[method].why_unsupported(family)


def test_per_zoo_settings_override_the_method_and_the_schedule(params):
    params["method"]["mlp"]["per_zoo"] = {"digits_inr": {"epochs": 3, "hidden": 64}}
    assert config.train_config(params, "digits_inr", "mlp") == config.TrainConfig(3, 32, 80)
    assert config.train_config(params, "digits_cnn", "mlp") == config.train_config(params, "digits_cnn")
    cfg = config.method_config(params, "mlp", "digits_inr")
    assert cfg["hidden"] == 64 and "epochs" not in cfg and "per_zoo" not in cfg
    assert config.method_config(params, "mlp", "digits_cnn")["hidden"] == params["method"]["mlp"]["hidden"]
    params["method"]["mlp"]["per_zoo"] = {"digits_inr": {"hiden": 3}}
    with pytest.raises(ProbegenError, match=r"method.mlp: unknown key 'hiden'"):
        config.method_config(params, "mlp", "digits_inr")
    params["method"]["mlp"]["per_zoo"] = {"digits_inr": 5}
    with pytest.raises(ProbegenError, match=r"method.mlp.per_zoo.digits_inr: expected a mapping"):
        config.train_config(params, "digits_inr", "mlp")

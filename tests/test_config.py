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
    assert config.method_names(params, "weights") == ["mlp", "statnn"]
    for zoo in ("digits_inr", "digits_cnn", "mnist_inr", "fmnist_inr", "cifar10_gs", "wild_park"):
        config.zoo_config(params, zoo)
        config.split_config(params, zoo)
        config.train_config(params, zoo)
    for method in ("probegen", "vanilla", "synthetic", "mlp", "statnn"):
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

"""The Wild Park reader on a zoo trained here, written in the published layout.

Small Wild Park CNNs (residual connections, several activations) are trained for a few steps on RGB images
made from sklearn's digits; each checkpoint records its accuracy on a fixed evaluation set, as the zoo
generator recorded `test/acc`. Packing and then forwarding the packed zoo in one mixed-architecture batch
must reproduce every model's logits and recorded accuracy exactly.
"""

import dataclasses
import pathlib
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.datasets import load_digits

from probegen.errors import ProbegenError
from probegen.nets import forward_zoo
from probegen.nets import wild_park as wp
from probegen.zoo.formats import wild_park as fmt
from probegen.zoo.packed import load_packed

TOP = "cifar10_zooV2"  # the official split file names checkpoints under this folder

RUNS = [  # (channels, kernel sizes, residual sources, activations), one architecture per run
    ([8, 4, 8, 8], [3, 5, 3, 3], [-1, -1, 0, 1], ["relu", "gelu", "leaky_relu", "tanh"]),
    ([4, 8, 8], [7, 3, 3], [-1, -1, 0], ["sigmoid", "none", "relu"]),
    ([8, 8], [3, 5], [-1, -1], ["tanh", "gelu"]),
    ([8, 4, 4], [5, 3, 3], [-1, -1, 0], ["leaky_relu", "relu", "sigmoid"]),  # residual 8 -> 4 channels
]
STEPS = (4, 12)  # checkpoints saved after these many training steps


def arch_of(run):
    channels, kernels, residual, activation = run
    return wp.check_arch({"in_channels": 3, "channels": channels, "kernel_size": kernels,
                          "stride": [1] * len(kernels), "padding": [k // 2 for k in kernels],
                          "residual": residual, "activation": activation, "num_classes": 10})


def digits_rgb():
    """sklearn digits as normalized 32x32 RGB images: (N, 3, 32, 32), labels (N,)."""
    digits = load_digits()
    gray = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # (N, 1, 8, 8) in [0, 1]
    gray = torch.nn.functional.interpolate(gray, size=32, mode="bilinear", align_corners=False)
    tint = torch.rand(len(gray), 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.5
    return wp.normalize(gray * tint), torch.tensor(digits.target)


def accuracy(logits, labels):
    """The zoo generator's evaluate(): argmax over classes, correct / len."""
    return (logits.argmax(-1) == labels).sum().item() / len(labels)


class ForeignModules:
    """Modules named like neural-graphs' CNNConfig home while the zoo is written, removed afterwards."""

    NAME = "experiments.cnn_generalization.dataset.cnn_sampler"

    def __enter__(self):
        @dataclasses.dataclass(frozen=True)
        class CNNConfig:
            n_layers: int
            n_classes: int
            channels: list[int]
            kernel_size: list[int]
            stride: list[int]
            padding: list[int]
            residual: list[int]
            activation: list[str]

        parts = self.NAME.split(".")
        for i in range(1, len(parts) + 1):
            sys.modules[".".join(parts[:i])] = types.ModuleType(".".join(parts[:i]))
        CNNConfig.__module__, CNNConfig.__qualname__ = self.NAME, "CNNConfig"
        sys.modules[self.NAME].CNNConfig = CNNConfig
        return CNNConfig

    def __exit__(self, *exc):
        for name in [m for m in sys.modules if m == "experiments" or m.startswith("experiments.")]:
            del sys.modules[name]


def save(path, model, arch, acc, run_index, step):
    """Runs 0-1 store the config as the real zoo does: an OmegaConf node of the trainer's whole config,
    structured by the generator's CNNConfig dataclass (whose module the reader does not have). Run 2
    stores a plain OmegaConf dict, run 3 a plain dict (the weights_only=True path)."""
    cfg = wp.to_config(arch)
    if run_index < 2:
        with ForeignModules() as CNNConfig:
            root = OmegaConf.create({"model": CNNConfig(**cfg), "batch_size": 512, "seed": 1})
            fmt.write_checkpoint(path, model.state_dict(), root.model, acc, iteration=step)
    else:
        fmt.write_checkpoint(path, model.state_dict(), cfg, acc, as_omegaconf=run_index == 2, iteration=step)


def train_zoo(raw, train_x, train_y, eval_x, eval_y):
    records = {}  # id -> (arch, recorded accuracy)
    for r, run in enumerate(RUNS):
        arch = arch_of(run)
        torch.manual_seed(r)
        model = wp.WildParkCNN(arch)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(r)
        for step in range(1, max(STEPS) + 1):
            idx = torch.randint(len(train_x), (32,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in STEPS:
                with torch.no_grad():
                    acc = accuracy(model(eval_x), eval_y)
                rel = f"{TOP}/NN_tune_trainable_{r:05d}/checkpoint_{step:06d}/checkpoint.pt"
                save(raw / rel, model, arch, acc, r, step)
                records[rel] = (arch, acc)
    return records


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A raw folder with len(RUNS) x len(STEPS) checkpoints; returns (raw_dir, records, eval set)."""
    raw = tmp_path_factory.mktemp("wild_park") / "raw"
    images, targets = digits_rgb()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these convs are tiny: thread hand-offs cost more than they save
    try:
        records = train_zoo(raw, images[:1200], targets[:1200], images[1200:1400], targets[1200:1400])
    finally:
        torch.set_num_threads(threads)
    return raw, records, images[1200:1400], targets[1200:1400]


def test_pack_reproduces_every_model_and_its_recorded_accuracy(zoo, tmp_path):
    raw, records, eval_x, eval_y = zoo
    spec = fmt.pack(raw, tmp_path / "packed", progress=False)
    packed = load_packed(tmp_path / "packed")
    assert spec == packed.spec and {k: spec[k] for k in fmt.SPEC} == fmt.SPEC
    assert len(packed) == spec["num_models"] == len(records) and len(packed.archs) == len(RUNS)
    assert sorted(packed.meta["id"]) == sorted(records)
    n_max = max(sum(np.prod(s) for _, s in wp.param_shapes(a)) for a, _ in records.values())
    assert packed.weights.shape[1] == n_max
    # Stored ragged: each model takes exactly its own parameter count on disk, no padding.
    own = [sum(np.prod(s) for _, s in wp.param_shapes(records[i][0])) for i in packed.meta["id"]]
    np.testing.assert_array_equal(np.diff(np.load(tmp_path / "packed" / "offsets.npy")), own)
    assert np.load(tmp_path / "packed" / "weights.npy").shape == (sum(own),) and min(own) < n_max

    # One mixed batch of every architecture, in a scrambled order, through the shared dispatcher.
    order = torch.randperm(len(packed), generator=torch.Generator().manual_seed(0))
    weights = packed.weights[order]
    arch_ids = torch.from_numpy(np.array(packed.arch_ids))[order]
    with torch.no_grad():
        logits = forward_zoo("wild_park", packed.archs, arch_ids, weights, eval_x)  # (N, 200, 10)
    for j, i in enumerate(order.tolist()):
        row = packed.meta.iloc[i]
        arch, recorded = records[row["id"]]
        assert packed.archs[row["arch"]] == arch
        assert packed.labels[i] == np.float32(recorded)
        assert row["run"] == row["id"].rsplit("/", 2)[0]
        assert row["step"] == row["iteration"] and row["step"] in STEPS
        module = wp.WildParkCNN(arch)
        module.load_state_dict(fmt.load_checkpoint(raw / row["id"])["model"])  # the checkpoint itself
        with torch.no_grad():
            torch.testing.assert_close(logits[j], module(eval_x), atol=1e-5, rtol=0)
            torch.testing.assert_close(logits[j], wp.reference_module(arch, packed.weights[i])(eval_x),
                                       atol=1e-5, rtol=0)
        assert accuracy(logits[j], eval_y) == recorded
    # The trained models differ from each other (the check above is not vacuous).
    assert len({round(acc, 6) for _, acc in records.values()}) > 2


def test_meta_carries_the_config_fields(zoo, tmp_path):
    raw, records, _, _ = zoo
    fmt.pack(raw, tmp_path / "packed", progress=False)
    meta = load_packed(tmp_path / "packed").meta
    row = meta[meta["id"] == f"{TOP}/NN_tune_trainable_00000/checkpoint_000012/checkpoint.pt"].iloc[0]
    assert row["run"] == f"{TOP}/NN_tune_trainable_00000" and row["step"] == 12
    assert row["channels"] == "[3, 8, 4, 8, 8]" and row["residual"] == "[-1, -1, 0, 1]"
    assert row["activation"] == '["relu", "gelu", "leaky_relu", "tanh"]' and row["n_layers"] == 4


def test_real_style_configs_load_without_neural_graphs_installed(zoo):
    raw, records, _, _ = zoo
    path = raw / f"{TOP}/NN_tune_trainable_00000/checkpoint_000004/checkpoint.pt"
    with pytest.raises(ModuleNotFoundError, match="experiments"):  # what a plain torch.load does
        torch.load(path, weights_only=False)
    cfg = fmt._plain_config(fmt.load_checkpoint(path)["config"])
    assert wp.arch_from_config(cfg) == records[path.relative_to(raw).as_posix()][0]


def copy_zoo(raw, tmp_path):
    dst = tmp_path / "raw"
    shutil.copytree(raw, dst)
    return dst, sorted(dst.rglob("checkpoint.pt"))


def test_truncated_checkpoint_is_one_clear_error_and_no_output(zoo, tmp_path):
    raw, paths = copy_zoo(zoo[0], tmp_path)
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) // 2])
    with pytest.raises(ProbegenError) as err:
        fmt.pack(raw, tmp_path / "packed", progress=False)
    message = str(err.value)
    assert str(paths[3]) in message and "corrupt" in message and "\n" not in message
    assert not (tmp_path / "packed").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".packed")]


def test_garbage_checkpoint_is_reported(zoo, tmp_path):
    raw, paths = copy_zoo(zoo[0], tmp_path)
    paths[0].write_bytes(b"not a checkpoint at all")
    with pytest.raises(ProbegenError, match=f"{paths[0]}: corrupt"):
        fmt.pack(raw, tmp_path / "packed", progress=False)


def small_model(activation="relu"):
    arch = arch_of(([4, 4, 4], [3, 3, 3], [-1, -1, 0], [activation] * 3))
    return arch, wp.WildParkCNN(arch).state_dict()


@pytest.mark.parametrize("case, message", [
    ("missing_key", "needs the keys model, config, last_result"),
    ("no_label", r"last_result\['test/acc'\] is missing"),
    ("wrong_shape", r"does not match its config \(layers.1.weight"),
    ("extra_param", r"does not match its config \(missing \[\], unexpected \['layers.3.bias'\]"),
    ("unknown_activation", "unknown activation 'swish'"),
    ("bad_layout", "expected the layout"),
])
def test_bad_checkpoints_name_the_file(tmp_path, case, message):
    arch, sd = small_model()
    cfg = wp.to_config(arch)
    folder = "trial_0/checkpoint_000001" if case != "bad_layout" else "trial_0/final"
    path = tmp_path / "raw" / folder / "checkpoint.pt"
    if case == "wrong_shape":
        sd["layers.1.weight"] = torch.zeros(4, 4, 5, 5)
    if case == "extra_param":
        sd["layers.3.bias"] = torch.zeros(4)
    if case == "unknown_activation":
        cfg["activation"] = ["relu", "swish", "relu"]
    fmt.write_checkpoint(path, sd, cfg, 0.5, as_omegaconf=True)
    if case == "missing_key":
        torch.save({"config": OmegaConf.create(cfg), "last_result": {"test/acc": 0.5}}, path)
    if case == "no_label":
        torch.save({"model": sd, "config": cfg, "last_result": {"test/loss": 1.0}}, path)
    with pytest.raises(ProbegenError, match=message) as err:
        fmt.pack(tmp_path / "raw", tmp_path / "packed", progress=False)
    assert str(path) in str(err.value)
    assert not (tmp_path / "packed").exists()


def test_nonfinite_models_are_dropped_on_request(tmp_path):
    for i in range(3):
        arch, sd = small_model("gelu")
        if i == 1:
            sd["fc.bias"][0] = float("nan")
        fmt.write_checkpoint(tmp_path / "raw" / f"t/checkpoint_{i:06d}/checkpoint.pt", sd, wp.to_config(arch), 0.1)
    with pytest.raises(ProbegenError, match="checkpoint_000001/checkpoint.pt: non-finite"):
        fmt.pack(tmp_path / "raw", tmp_path / "packed", progress=False)
    spec = fmt.pack(tmp_path / "raw", tmp_path / "packed", nonfinite="drop", progress=False)
    assert spec["num_models"] == 2 and spec["dropped_nonfinite"] == 1


def ray_style_checkpoint(path, arch, acc, step, protocol):
    """What NN_tune_trainable.save_checkpoint writes: model and optimizer state, the model's OmegaConf node
    (structured by CNNConfig; its parent is the whole trial config, with a pathlib dataset path), and Ray's
    get_state(), whose last_result repeats the trial config (the CNNConfig instance itself)."""
    model = wp.WildParkCNN(arch)
    with ForeignModules() as CNNConfig:
        trial = {"model": CNNConfig(**wp.to_config(arch)), "batch_size": 512, "seed": 1, "device": "cpu",
                 "data": {"root": "~/data", "efficient_dataset_path": pathlib.PosixPath("/data/cifar10.pt")},
                 "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3, "betas": [0.9, 0.999]}}
        cfg = OmegaConf.create(trial)
        # hydra.utils.instantiate passes config values as they are: betas stays a ListConfig
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=cfg.optimizer.betas)
        model(torch.zeros(2, 3, 8, 8)).sum().backward()
        opt.step()
        last_result = {"test/acc": acc, "test/loss": 1.25, "done": False, "training_iteration": step,
                       "trial_id": "a1b2c_00000", "date": "2023-09-01_12-00-00", "timestamp": 1693569600,
                       "time_this_iter_s": 0.5, "time_total_s": 2.0, "pid": 4242, "hostname": "node",
                       "node_ip": "10.0.0.1", "config": trial, "time_since_restore": 2.0,
                       "iterations_since_restore": step}
        ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": cfg.model,
                "experiment_id": "0123abcd", "iteration": step, "timesteps_total": None, "time_total": 2.0,
                "episodes_total": None, "last_result": last_result, "ray_version": "2.7.1"}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path, pickle_protocol=protocol)
    return model


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_ray_tune_checkpoints_load_with_every_pickle_protocol(tmp_path, protocol):
    arch = arch_of(RUNS[0])
    path = tmp_path / "raw" / TOP / "NN_tune_trainable_00000/checkpoint_000007/checkpoint.pt"
    model = ray_style_checkpoint(path, arch, 0.375, 7, protocol)
    ckpt = fmt.load_checkpoint(path)
    assert wp.arch_from_config(fmt._plain_config(ckpt["config"])) == arch
    trial_model = ckpt["last_result"]["config"]["model"]  # the CNNConfig instance: an inert stand-in
    assert isinstance(trial_model, fmt._StandIn) and trial_model.state == wp.to_config(arch)
    assert ckpt["last_result"]["config"]["data"]["efficient_dataset_path"] == pathlib.PosixPath("/data/cifar10.pt")
    spec = fmt.pack(tmp_path / "raw", tmp_path / "packed", progress=False)
    packed = load_packed(tmp_path / "packed")
    assert spec["num_models"] == 1 and packed.labels[0] == np.float32(0.375)
    assert packed.meta["iteration"][0] == 7 and packed.archs[0] == arch
    flat = torch.cat([v.reshape(-1) for v in model.state_dict().values()])
    torch.testing.assert_close(packed.weights[0][: len(flat)], flat, rtol=0, atol=0)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_foreign_globals_are_inert_stand_ins_and_known_ones_refused(tmp_path, zipfile):
    marker = tmp_path / "ran"

    foreign = _named(lambda *a: marker.touch(), "experiments.tools", "run")

    class Foreign:  # a function of a module this machine does not have: never imported, only recorded
        def __reduce__(self):
            return (foreign, ("touch", str(marker)))

    class Known:  # a function this machine does have (builtins.exec): refused by name
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    path = tmp_path / "x.pt"
    with ForeignModules():
        sys.modules["experiments.tools"] = types.ModuleType("experiments.tools")
        sys.modules["experiments.tools"].run = foreign
        torch.save({"model": {}, "config": Foreign(), "last_result": {}}, path,
                   _use_new_zipfile_serialization=zipfile)
    ckpt = fmt.load_checkpoint(path)
    assert isinstance(ckpt["config"], fmt._StandIn) and ckpt["config"].args == ("touch", str(marker))
    assert type(ckpt["config"]).__module__ == "experiments.tools" and not marker.exists()
    torch.save({"model": {}, "config": Known(), "last_result": {}}, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(ProbegenError, match=r"refused: the pickle names the global builtins\.exec") as err:
        fmt.load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value) and not marker.exists()


def _named(fn, module, name):
    fn.__module__, fn.__qualname__, fn.__name__ = module, name, name
    return fn


def test_interpolations_in_a_config_are_not_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBEGEN_TEST_SECRET", "4")
    arch, sd = small_model()
    cfg = {**wp.to_config(arch), "n_classes": "${oc.env:PROBEGEN_TEST_SECRET}"}
    path = tmp_path / "raw/t/checkpoint_000001/checkpoint.pt"
    fmt.write_checkpoint(path, sd, cfg, 0.5, as_omegaconf=True)
    with pytest.raises(ProbegenError) as err:  # a resolver would have read the environment
        fmt.pack(tmp_path / "raw", tmp_path / "packed", progress=False)
    assert "oc.env" in str(err.value) and str(path) in str(err.value)


def test_ckpt_and_last_result_must_be_plain_dicts(tmp_path):
    arch, sd = small_model()
    path = tmp_path / "raw/t/checkpoint_000001/checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": sd, "config": OmegaConf.create(wp.to_config(arch)),
                "last_result": OmegaConf.create({"test/acc": 0.5})}, path)
    with pytest.raises(ProbegenError, match=r"last_result\['test/acc'\] is missing"):
        fmt.pack(tmp_path / "raw", tmp_path / "packed", progress=False)
    torch.save({"model": sd, "config": wp.to_config(arch), "last_result": {"test/acc": 0.5}, "iteration": "7"}, path)
    with pytest.raises(ProbegenError, match="iteration is a str, not an int"):
        fmt.pack(tmp_path / "raw", tmp_path / "packed", progress=False)

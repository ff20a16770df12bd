import json

import numpy as np
import pandas as pd
import pytest
import torch

from probegen.errors import ProbegenError
from probegen.nets import forward_zoo, small_cnn
from probegen.zoo.formats import small_cnn_zoo as fmt
from probegen.zoo.packed import load_packed

# REFERENCE §2: per layer the bias before the kernel; TF kernel shapes.
PUBLISHED = [
    ("sequential/conv2d/bias:0", 0, 16, (16,), "convs.0.bias"),
    ("sequential/conv2d/kernel:0", 16, 160, (3, 3, 1, 16), "convs.0.weight"),
    ("sequential/conv2d_1/bias:0", 160, 176, (16,), "convs.1.bias"),
    ("sequential/conv2d_1/kernel:0", 176, 2480, (3, 3, 16, 16), "convs.1.weight"),
    ("sequential/conv2d_2/bias:0", 2480, 2496, (16,), "convs.2.bias"),
    ("sequential/conv2d_2/kernel:0", 2496, 4800, (3, 3, 16, 16), "convs.2.weight"),
    ("sequential/dense/bias:0", 4800, 4810, (10,), "fc.bias"),
    ("sequential/dense/kernel:0", 4810, 4970, (16, 10), "fc.weight"),
]
STEPS = (0, 43, 86)


def make_zoo(path, n_runs=5, seed=0):
    """A small zoo in the published layout: run-major rows, 3 checkpoints per run, TF kernels."""
    rng = np.random.default_rng(seed)
    n = n_runs * len(STEPS)
    weights_tf = (rng.standard_normal((n, 4970)) * 0.2).astype(np.float32)
    acts = np.repeat(rng.choice(["relu", "tanh"], n_runs), len(STEPS))
    acts[:len(STEPS)], acts[len(STEPS):2 * len(STEPS)] = "relu", "tanh"  # both archs present
    metrics = pd.DataFrame({
        "config.activation": acts, "config.dropout": np.repeat(rng.uniform(0, 0.7, n_runs), len(STEPS)),
        "config.init_std": 0.05, "config.l2reg": 1e-4, "config.learning_rate": 5e-3,
        "config.optimizer": np.repeat(rng.choice(["sgd", "adam", "rmsprop"], n_runs), len(STEPS)),
        "config.train_fraction": 0.5, "config.w_init": "he_normal",
        "modeldir": [f"runs/{i // len(STEPS)}" for i in range(n)], "step": np.tile(STEPS, n_runs),
        "test_accuracy": rng.uniform(0.1, 0.6, n), "train_accuracy": rng.uniform(0.1, 0.7, n)})
    fmt.write_zoo(path, weights_tf, metrics)
    return weights_tf, metrics


def module_from_tf_row(row_tf, activation):
    """The independent conversion: slice the published offsets, transpose each kernel explicitly."""
    state = {}
    for _, start, end, shape, name in PUBLISHED:
        t = row_tf[start:end].reshape(shape)
        if len(shape) == 4:
            t = t.transpose(3, 2, 0, 1)  # (H, W, in, out) -> (out, in, H, W)
        elif len(shape) == 2:
            t = t.T  # (in, out) -> (out, in)
        state[name] = torch.from_numpy(np.ascontiguousarray(t))
    module = small_cnn.SmallCNN(small_cnn.zoo_arch(activation))
    module.load_state_dict(state)
    return module


@pytest.fixture
def zoo(tmp_path):
    weights_tf, metrics = make_zoo(tmp_path / "raw")
    return tmp_path, weights_tf, metrics


def assert_no_output(tmp_path):
    assert not (tmp_path / "packed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temporary folder left behind


def test_layout_csv_is_the_published_one(zoo):
    tmp_path = zoo[0]
    layout = pd.read_csv(tmp_path / "raw" / "layout.csv")
    assert list(layout.columns) == ["varname", "start_idx", "end_idx", "shape"]
    got = [(r.varname, r.start_idx, r.end_idx, r.shape) for r in layout.itertuples()]
    assert got == [(v, s, e, str(shape)) for v, s, e, shape, _ in PUBLISHED]
    assert layout["shape"][1] == "(3, 3, 1, 16)"  # a tuple literal, as NFN's eval(row["shape"]) reads it


def test_pack_keeps_final_checkpoints_in_torch_layout(zoo):
    tmp_path, weights_tf, metrics = zoo
    spec = fmt.pack(tmp_path / "raw", tmp_path / "packed", progress=False)
    packed = load_packed(tmp_path / "packed")
    final = np.flatnonzero(metrics["step"] == 86)
    assert spec["num_models"] == len(packed) == len(final) and spec["dropped_nonfinite"] == 0
    assert spec["family"] == "small_cnn" and spec["task"] == "regression" and spec["final_step"] == 86
    assert packed.meta["row"].tolist() == final.tolist()
    assert packed.meta["id"].tolist() == [f"weights.npy:{r}" for r in final]
    assert (packed.meta["step"] == 86).all()
    np.testing.assert_array_equal(packed.labels, metrics["test_accuracy"].to_numpy(np.float32)[final])
    np.testing.assert_allclose(packed.meta["train_accuracy"], metrics["train_accuracy"].to_numpy()[final])
    for col in ("config.optimizer", "config.dropout", "config.w_init", "modeldir"):
        assert packed.meta[col].tolist() == metrics[col].to_numpy()[final].tolist()
    acts = metrics["config.activation"].to_numpy()[final]
    assert [packed.archs[a]["activation"] for a in packed.arch_ids] == acts.tolist()

    x = torch.randn(6, 1, 32, 32)
    batched = forward_zoo("small_cnn", packed.archs, torch.tensor(packed.arch_ids),
                          packed.weights[:], x)  # (n, 6, 10)
    for i, row in enumerate(final):
        ref = module_from_tf_row(weights_tf[row], acts[i])
        flat = torch.cat([p.flatten() for p in ref.state_dict().values()]).numpy()
        np.testing.assert_array_equal(packed.weights[i], flat)  # the conversion is an exact permutation
        torch.testing.assert_close(batched[i], ref(x), atol=1e-5, rtol=0)


def test_final_step_and_explicit_rows(zoo):
    tmp_path, _, metrics = zoo
    spec = fmt.pack(tmp_path / "raw", tmp_path / "packed", final_step=43, rows=[14, 1, 4, 2, 7, 1],
                    progress=False)
    packed = load_packed(tmp_path / "packed")
    assert packed.meta["row"].tolist() == [1, 4, 7] and (packed.meta["step"] == 43).all()
    assert spec["final_step"] == 43
    with pytest.raises(ProbegenError, match="row 99 requested"):
        fmt.pack(tmp_path / "raw", tmp_path / "other", rows=[2, 99], progress=False)


def test_the_published_top_level_folder_is_found(tmp_path):
    # cifar10.tar.xz unpacks into cifar10/: the raw folder holds the zoo one level down.
    make_zoo(tmp_path / "raw" / "cifar10")
    fmt.pack(tmp_path / "raw", tmp_path / "packed", progress=False)
    assert load_packed(tmp_path / "packed").meta["row"].tolist() == [2, 5, 8, 11, 14]
    make_zoo(tmp_path / "raw" / "copy")
    with pytest.raises(ProbegenError, match=r"raw: several Small CNN Zoo folders"):
        fmt.pack(tmp_path / "raw", tmp_path / "other", progress=False)


def test_final_step_none_takes_each_runs_last_checkpoint(tmp_path):
    weights_tf, metrics = make_zoo(tmp_path / "raw")
    keep = metrics.index != 14  # run 4 lost its last checkpoint: its step 43 is its last
    fmt.write_zoo(tmp_path / "raw", weights_tf[keep], metrics[keep].reset_index(drop=True))
    spec = fmt.pack(tmp_path / "raw", tmp_path / "packed", final_step=None, progress=False)
    packed = load_packed(tmp_path / "packed")
    assert packed.meta["row"].tolist() == [2, 5, 8, 11, 13] and spec["final_step"] is None
    assert packed.meta["step"].tolist() == [86, 86, 86, 86, 43]


def test_conversion_is_driven_by_the_layout_table(zoo):
    tmp_path, weights_tf, _ = zoo
    layout_path = tmp_path / "raw" / "layout.csv"
    pt = fmt.to_torch_layout(weights_tf, layout_path)
    np.testing.assert_array_equal(fmt.to_tf_layout(pt, layout_path), weights_tf)
    shuffled = pd.read_csv(layout_path).sample(frac=1.0, random_state=0)  # row order must not matter
    np.testing.assert_array_equal(fmt.to_torch_layout(weights_tf, shuffled), pt)
    # A layout with the kernel first would put different numbers in convs.0.weight.
    swapped = pd.read_csv(layout_path)
    swapped.loc[0, ["start_idx", "end_idx"]] = [144, 160]
    swapped.loc[1, ["start_idx", "end_idx"]] = [0, 144]
    assert not np.array_equal(fmt.to_torch_layout(weights_tf, swapped), pt)


def test_nonfinite_final_rows_are_dropped_and_counted(tmp_path):
    weights_tf, metrics = make_zoo(tmp_path / "raw")
    weights_tf[2, 100] = np.nan  # final checkpoint of run 0
    weights_tf[8, 4969] = np.inf  # final checkpoint of run 2
    weights_tf[4, 0] = np.nan  # not final: never packed, not counted
    fmt.write_zoo(tmp_path / "raw", weights_tf, metrics)
    spec = fmt.pack(tmp_path / "raw", tmp_path / "packed", progress=False)
    packed = load_packed(tmp_path / "packed")
    assert spec["dropped_nonfinite"] == 2 and spec["num_models"] == 3
    assert packed.meta["row"].tolist() == [5, 11, 14]
    assert torch.isfinite(packed.weights[:]).all()
    with pytest.raises(ProbegenError, match=r"weights.npy:2: non-finite"):
        fmt.pack(tmp_path / "raw", tmp_path / "strict", nonfinite="error", progress=False)
    assert not (tmp_path / "strict").exists()


def test_peak_rss_is_reported_but_not_stored(zoo):
    tmp_path = zoo[0]
    spec = fmt.pack(tmp_path / "raw", tmp_path / "packed", progress=False)
    assert spec["peak_rss_mb"] > 0
    assert "peak_rss_mb" not in json.loads((tmp_path / "packed" / "spec.json").read_text())


def _truncate(raw):
    data = (raw / "weights.npy").read_bytes()
    (raw / "weights.npy").write_bytes(data[:len(data) - 5000])


def _garbage(raw):
    (raw / "weights.npy").write_bytes(b"this is not an npy file" * 100)


def _drop_metrics_row(raw):
    m = pd.read_csv(raw / "metrics.csv.gz")
    m.iloc[:-1].to_csv(raw / "metrics.csv.gz", index=False)


def _corrupt_gzip(raw):
    (raw / "metrics.csv.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")


def _unknown_activation(raw):
    m = pd.read_csv(raw / "metrics.csv.gz")
    m.loc[5, "config.activation"] = "selu"
    m.to_csv(raw / "metrics.csv.gz", index=False)


def _layout_wrong_shape(raw):
    layout = pd.read_csv(raw / "layout.csv")
    layout.loc[1, "shape"] = "(3, 3, 16, 1)"
    layout.to_csv(raw / "layout.csv", index=False)


def _layout_unknown_variable(raw):
    layout = pd.read_csv(raw / "layout.csv")
    layout.loc[7, "varname"] = "sequential/dense_1/kernel:0"
    layout.to_csv(raw / "layout.csv", index=False)


def _wrong_width(raw):
    np.save(raw / "weights.npy", np.zeros((15, 4000), dtype=np.float32))


def _missing_layout(raw):
    (raw / "layout.csv").unlink()


def _text_accuracy(raw):
    m = pd.read_csv(raw / "metrics.csv.gz")
    m["test_accuracy"] = m["test_accuracy"].astype(object)
    m.loc[8, "test_accuracy"] = "0.9l"  # a final checkpoint's label, damaged
    m.to_csv(raw / "metrics.csv.gz", index=False)


@pytest.mark.parametrize("damage, culprit, what", [
    (_truncate, "weights.npy", "truncated"),
    (_garbage, "weights.npy", "not a .npy"),
    (_drop_metrics_row, "metrics.csv.gz", "14 rows but weights.npy has 15"),
    (_corrupt_gzip, "metrics.csv.gz", "unreadable"),
    (_unknown_activation, "metrics.csv.gz", "row 5 has unknown config.activation 'selu'"),
    (_layout_wrong_shape, "layout.csv", r"is shape \(3, 3, 16, 1\)"),
    (_layout_unknown_variable, "layout.csv", "dense_1/kernel:0"),
    (_wrong_width, "weights.npy", "4000 columns"),
    (_missing_layout, "layout.csv", "missing"),
    (_text_accuracy, "metrics.csv.gz", "row 8: test_accuracy '0.9l' is not a number"),
])
def test_bad_zoo_gives_one_line_naming_the_file_and_no_output(zoo, damage, culprit, what):
    tmp_path = zoo[0]
    damage(tmp_path / "raw")
    with pytest.raises(ProbegenError, match=what) as err:
        fmt.pack(tmp_path / "raw", tmp_path / "packed", progress=False)
    message = str(err.value)
    assert message.startswith(str(tmp_path / "raw" / culprit)) and "\n" not in message
    assert_no_output(tmp_path)


def test_no_checkpoint_at_the_final_step(zoo):
    tmp_path = zoo[0]
    with pytest.raises(ProbegenError, match=r"no checkpoint with step == 7 \(steps found: \[0, 43, 86\]\)"):
        fmt.pack(tmp_path / "raw", tmp_path / "packed", final_step=7, progress=False)
    assert_no_output(tmp_path)


def test_write_zoo_is_byte_deterministic(tmp_path):
    make_zoo(tmp_path / "a")
    make_zoo(tmp_path / "b")
    for name in fmt.FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_write_zoo_rejects_mismatched_metrics(tmp_path):
    with pytest.raises(ProbegenError, match="metrics need 3 rows"):
        fmt.write_zoo(tmp_path / "raw", np.zeros((3, 4970), np.float32), pd.DataFrame({"step": [86]}))
    assert not (tmp_path / "raw").exists()

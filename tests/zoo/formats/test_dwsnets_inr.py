"""The DWSNets INR reader on fixtures written in both published layouts, and its one-line errors."""

import json

import numpy as np
import pytest
import torch

from probegen.errors import ProbegenError
from probegen.nets import siren
from probegen.zoo.formats import dwsnets_inr as fmt
from probegen.zoo.packed import load_packed

ARCH = siren.DWSNETS_ARCH
D = 1185


def random_row(seed):
    return torch.randn(D, generator=torch.Generator().manual_seed(seed)) * 0.2


def write_mnist(raw, models):
    """models: [(split, digit, id, seed)] -> {relative path: (row, label)}"""
    out = {}
    for split, digit, idx, seed in models:
        rel = f"mnist-inrs/mnist_png_{split}_{digit}_{idx}/checkpoints/model_final.pth"
        fmt.write_checkpoint(raw / rel, siren.state_dict(ARCH, random_row(seed)))
        out[rel] = (random_row(seed), digit)
    return out


def write_fmnist(raw, models):
    """models: [(split, idx, label, seed)] -> {relative path: (row, label)}"""
    out = {}
    for split, idx, label, seed in models:
        rel = f"fmnist_inrs/{split}/model_{idx}.pth"
        fmt.write_checkpoint(raw / rel, siren.state_dict(ARCH, random_row(seed)), label=label)
        out[rel] = (random_row(seed), label)
    return out


MNIST = [("training", 3, 17, 0), ("training", 0, 5, 1), ("testing", 9, 2, 2), ("training", 3, 4, 3)]
FMNIST = [("train", 12, 7, 10), ("train", 3, 0, 11), ("test", 0, 9, 12)]


def check_packed(out, expected):
    zoo = load_packed(out)
    ids = sorted(expected)
    assert list(zoo.meta["id"]) == ids  # sorted, deterministic order
    for i, rel in enumerate(ids):
        row, label = expected[rel]
        np.testing.assert_array_equal(zoo.weights[i], row.numpy())
        assert zoo.labels[i] == label
    assert zoo.labels.dtype == np.int64
    assert zoo.spec["family"] == "siren" and zoo.spec["format"] == "dwsnets_inr"
    assert zoo.spec["num_classes"] == 10 and zoo.spec["task"] == "classification"
    assert zoo.spec["archs"] == [ARCH] and zoo.spec["num_models"] == len(ids)
    return zoo


def test_mnist_layout_labels_from_folder_names(tmp_path):
    expected = write_mnist(tmp_path / "raw", MNIST)
    spec = fmt.pack(tmp_path / "raw", tmp_path / "out", progress=False)
    zoo = check_packed(tmp_path / "out", expected)
    assert spec == zoo.spec
    assert list(zoo.meta["split_hint"]) == ["testing", "training", "training", "training"]


def test_fmnist_layout_labels_from_checkpoints(tmp_path):
    expected = write_fmnist(tmp_path / "raw", FMNIST)
    fmt.pack(tmp_path / "raw", tmp_path / "out", progress=False)
    zoo = check_packed(tmp_path / "out", expected)
    assert list(zoo.meta["split_hint"]) == ["test", "train", "train"]


def test_both_layouts_and_the_digits_prefix_in_one_folder(tmp_path):
    raw = tmp_path / "raw"
    expected = {**write_mnist(raw, MNIST[:2]), **write_fmnist(raw, FMNIST[:1])}
    rel = "digits-inrs/digits_png_training_5_42/checkpoints/model_final.pth"
    fmt.write_checkpoint(raw / rel, siren.state_dict(ARCH, random_row(99)))
    expected[rel] = (random_row(99), 5)
    (raw / "mnist-inrs" / "statistics.pth").write_bytes(b"not one of the published layouts")
    fmt.pack(raw, tmp_path / "out", progress=False)
    check_packed(tmp_path / "out", expected)


def test_checkpoint_is_what_dwsnets_loads(tmp_path):
    row = random_row(5)
    path = tmp_path / "model_1.pth"
    fmt.write_checkpoint(path, siren.state_dict(ARCH, row), label=4)
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    # neural-graphs keeps the keys containing "weight"/"bias" (in file order) and reads ["label"]
    params = [v for k, v in ckpt.items() if "weight" in k or "bias" in k]
    assert [k for k in ckpt if k != "label"] == [name for name, _ in siren.param_shapes(ARCH)]
    assert torch.equal(torch.cat([p.flatten() for p in params]), row) and ckpt["label"] == 4
    ref = siren.reference_module(ARCH, row)
    ref.load_state_dict({k: v for k, v in ckpt.items() if k != "label"})
    assert torch.equal(torch.nn.utils.parameters_to_vector(ref.parameters()), row)


def test_tensor_label_is_accepted(tmp_path):
    raw = tmp_path / "raw"
    state = dict(siren.state_dict(ARCH, random_row(0)), label=torch.tensor(6))
    (raw / "fmnist_inrs" / "train").mkdir(parents=True)
    torch.save(state, raw / "fmnist_inrs" / "train" / "model_0.pth")
    fmt.pack(raw, tmp_path / "out", progress=False)
    assert load_packed(tmp_path / "out").labels.tolist() == [6]


def corrupt(path):
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def rewrite(change):
    def edit(path):
        ckpt = torch.load(path, weights_only=True)
        change(ckpt)
        torch.save(ckpt, path)
    return edit


def wrong_shape(ckpt):
    ckpt["seq.1.weight"] = torch.zeros(32, 16)


def missing_key(ckpt):
    del ckpt["seq.2.bias"]


def extra_key(ckpt):
    ckpt["seq.3.weight"] = torch.zeros(1, 1)


def missing_label(ckpt):
    del ckpt["label"]


def bad_label(ckpt):
    ckpt["label"] = 11


def nan_weight(ckpt):
    ckpt["seq.1.weight"][3, 4] = float("nan")


@pytest.mark.parametrize("damage, words", [
    (corrupt, "unreadable checkpoint"),
    (truncate, "unreadable checkpoint"),
    (rewrite(wrong_shape), "seq.1.weight has shape (32, 16), expected (32, 32)"),
    (rewrite(missing_key), "missing ['seq.2.bias']"),
    (rewrite(extra_key), "unexpected ['seq.3.weight']"),
    (rewrite(missing_label), "missing `label`"),
    (rewrite(bad_label), "label must be an int in [0, 10), got 11"),
    (rewrite(nan_weight), "non-finite"),
])
def test_bad_checkpoint_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, damage, words):
    raw = tmp_path / "raw"
    write_fmnist(raw, FMNIST)
    bad = raw / "fmnist_inrs" / "train" / "model_3.pth"
    damage(bad)
    with pytest.raises(ProbegenError) as err:
        fmt.pack(raw, tmp_path / "out", nonfinite="error", progress=False)
    message = str(err.value)
    assert "model_3.pth" in message and words in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no output, no temporary folder


def test_nan_weights_dropped_and_counted(tmp_path):
    raw = tmp_path / "raw"
    expected = write_mnist(raw, MNIST)
    bad = "mnist-inrs/mnist_png_training_0_5/checkpoints/model_final.pth"
    rewrite(nan_weight)(raw / bad)
    del expected[bad]
    spec = fmt.pack(raw, tmp_path / "out", nonfinite="drop", progress=False)
    assert spec["dropped_nonfinite"] == 1
    check_packed(tmp_path / "out", expected)


def test_no_checkpoints_found(tmp_path):
    (tmp_path / "raw" / "mnist-inrs").mkdir(parents=True)
    with pytest.raises(ProbegenError, match="no DWSNets INR checkpoints found"):
        fmt.pack(tmp_path / "raw", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_stored_label_must_agree_with_folder(tmp_path):
    raw = tmp_path / "raw"
    rel = "mnist-inrs/mnist_png_training_3_1/checkpoints/model_final.pth"
    fmt.write_checkpoint(raw / rel, siren.state_dict(ARCH, random_row(0)), label=4)
    with pytest.raises(ProbegenError, match="stored label 4 disagrees with the folder's digit 3"):
        fmt.pack(raw, tmp_path / "out", progress=False)


def write_split_file(path, labels_by_path, prefix="/cluster/data/"):
    """The neural-graphs split format, the authors' absolute paths: {split: {path, label}}."""
    paths = sorted(labels_by_path)
    split = {"train": paths[:-1], "val": [], "test": paths[-1:]}
    path.write_text(json.dumps({name: {"path": [prefix + p for p in ps], "label": [labels_by_path[p] for p in ps]}
                                for name, ps in split.items()}))
    return path


def test_labels_that_live_only_in_the_split_file_are_read_from_it(tmp_path):
    raw = tmp_path / "raw"
    expected = {}
    for split, idx, label, seed in FMNIST:  # fmnist layout, but checkpoints without their `label` key
        rel = f"fmnist_inrs/{split}/model_{idx}.pth"
        fmt.write_checkpoint(raw / rel, siren.state_dict(ARCH, random_row(seed)))
        expected[rel] = (random_row(seed), label)
    with pytest.raises(ProbegenError, match="missing `label`.*pack.label_file"):
        fmt.pack(raw, tmp_path / "none", progress=False)
    split_file = write_split_file(tmp_path / "fmnist_splits.json", {rel: lab for rel, (_, lab) in expected.items()})
    fmt.pack(raw, tmp_path / "out", progress=False, label_file=split_file)
    check_packed(tmp_path / "out", expected)


def test_a_split_file_that_disagrees_with_a_checkpoint_is_refused(tmp_path):
    raw = tmp_path / "raw"
    expected = write_mnist(raw, MNIST)
    labels = {rel: lab for rel, (_, lab) in expected.items()}
    first = sorted(labels)[0]
    labels[first] = (labels[first] + 1) % 10
    split_file = write_split_file(tmp_path / "mnist_splits.json", labels)
    with pytest.raises(ProbegenError, match=r"folder's digit \d disagrees with the split file's label"):
        fmt.pack(raw, tmp_path / "out", progress=False, label_file=split_file)
    assert not (tmp_path / "out").exists()

"""Deterministic splits and the official split files, on synthetic files in the published formats."""

import json
import random

import numpy as np
import pandas as pd
import pytest

from probegen.errors import ProbegenError
from probegen.config import SplitConfig
from probegen.nets import num_params
from probegen.nets.siren import DWSNETS_ARCH
from probegen.zoo.packed import PackedWriter, PackedZoo, ragged
from probegen.zoo.splits import (SPLITS, build_split, deterministic_split, inr_official_split, load_split,
                                 make_split, save_split, small_cnn_official_split, wild_park_official_split)

SMALL_CNN_STEPS = [0, 1, 2, 3, 20, 40, 60, 80, 86]  # the 9 checkpoints of every Small CNN Zoo run


def assert_partition(split, n):
    rows = [r for name in SPLITS for r in split[name]]
    assert len(rows) == len(set(rows)) == n and set(rows) == set(range(n))


# -----------------------------------------------------------------------------
# deterministic

def test_deterministic_stratified():
    rng = np.random.default_rng(1)
    labels = rng.choice(10, size=2000, p=np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum())
    split = deterministic_split(labels, val=0.1, test=0.2, seed=0, stratify=True)
    assert_partition(split, len(labels))
    for c in range(10):
        n_c = (labels == c).sum()
        for name, frac in (("val", 0.1), ("test", 0.2)):
            got = (labels[split[name]] == c).sum()
            assert abs(got - frac * n_c) <= 1, (c, name, got, n_c)
    assert split == deterministic_split(labels, val=0.1, test=0.2, seed=0, stratify=True)
    assert split != deterministic_split(labels, val=0.1, test=0.2, seed=1, stratify=True)


def test_deterministic_unstratified_regression():
    labels = np.random.default_rng(0).random(1000).astype(np.float32)
    split = deterministic_split(labels, val=0.15, test=0.25, seed=3, stratify=False)
    assert_partition(split, 1000)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (600, 150, 250)


def test_deterministic_refuses_impossible_requests():
    with pytest.raises(ProbegenError, match="val \\+ test < 1"):
        deterministic_split(np.zeros(100), val=0.5, test=0.5, stratify=False)
    with pytest.raises(ProbegenError, match="3 models are too few for a 0.1 val"):
        deterministic_split(np.zeros(3), val=0.1, test=0.2, stratify=False)


# -----------------------------------------------------------------------------
# Small CNN Zoo

def write_order_file(path, n_rows, seed=0):
    """The published format: a pandas-written permutation whose header line "0" reads as a row."""
    perm = np.random.default_rng(seed).permutation(n_rows)
    path.write_text("0\n" + "\n".join(map(str, perm)) + "\n")
    return path


def nfn_reference(order_csv, steps):
    """The NFN / Neural Graphs code path (NFNZooDataset), on a metrics table: returns weights.npy rows."""
    metrics = pd.DataFrame({"step": steps, "row": np.arange(len(steps))})
    shuffled_idcs = pd.read_csv(order_csv, header=None).values.flatten()
    metrics = metrics.iloc[shuffled_idcs]
    metrics = metrics[metrics["step"] == 86]
    n = len(metrics)
    test_split_point = int(0.5 * n)
    trainval_idcs = list(range(test_split_point))
    val_point = int(0.8 * len(trainval_idcs))
    random.Random(0).shuffle(trainval_idcs)
    idcs = {"test": list(range(test_split_point, n)), "train": trainval_idcs[:val_point],
            "val": trainval_idcs[val_point:]}
    return {name: metrics["row"].to_numpy()[ix].tolist() for name, ix in idcs.items()}


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    runs = 30_000
    order = write_order_file(tmp_path_factory.mktemp("zoo") / "nfn_cifar10_split.csv", runs * 9)
    return order, runs


def test_small_cnn_reproduces_published_sizes(small_cnn):
    order, runs = small_cnn
    assert len(order.read_text().splitlines()) == 270_001
    steps = np.tile(SMALL_CNN_STEPS, runs)  # row 0 is an initialisation checkpoint
    meta = pd.DataFrame({"row": np.arange(runs * 9), "step": steps})
    split = small_cnn_official_split(order, meta)
    assert {k: len(v) for k, v in split.items()} == {"train": 12_000, "val": 3_000, "test": 15_000}
    final = set(np.flatnonzero(steps == 86).tolist())
    assert set(split["train"]) | set(split["val"]) | set(split["test"]) == final
    # packed rows == weights.npy rows here, so the split must be exactly the NFN code's
    assert split == nfn_reference(order, steps)

    # a packed zoo holding only the final checkpoints gives the same models
    finals = np.flatnonzero(steps == 86)
    packed = pd.DataFrame({"row": finals, "step": 86})
    split_final = small_cnn_official_split(order, packed)
    assert {k: finals[v].tolist() for k, v in split_final.items()} == split


def test_small_cnn_stray_header_row_is_not_duplicated(small_cnn):
    order, runs = small_cnn
    steps = np.tile(SMALL_CNN_STEPS[::-1], runs)  # now row 0 is a final checkpoint, listed twice
    meta = pd.DataFrame({"row": np.arange(runs * 9), "step": steps})
    split = small_cnn_official_split(order, meta)
    reference = nfn_reference(order, steps)
    assert len(reference["test"]) == 15_001 and len(reference["train"]) == 12_000
    rows = split["train"] + split["val"] + split["test"]
    assert len(rows) == len(set(rows)) == 30_000  # disjoint, every final model once
    assert split["test"] == reference["test"]
    for name in ("train", "val"):  # the NFN lists, minus the stray header's copy of row 0
        assert 0 <= len(reference[name]) - len(split[name]) <= 1
        assert set(split[name]) <= set(reference[name])


def test_small_cnn_order_file_missing_a_model(tmp_path):
    order = tmp_path / "order.csv"
    order.write_text("0\n" + "\n".join(map(str, range(17))) + "\n")  # rows 0..16, the zoo has 0..17
    meta = pd.DataFrame({"row": np.arange(18), "step": np.tile(SMALL_CNN_STEPS, 2)})
    with pytest.raises(ProbegenError, match=r"order\.csv: row 17 of the packed zoo"):
        small_cnn_official_split(order, meta)
    order.write_text("0\n3\nthree\n")
    with pytest.raises(ProbegenError, match=r"order\.csv: entry 3 \('three'\)"):
        small_cnn_official_split(order, meta)


# -----------------------------------------------------------------------------
# INR and Wild Park split files

def mnist_zoo(n=60, seed=0):
    """Packed-zoo meta/labels for synthetic MNIST INRs, in a shuffled packing order."""
    rng = np.random.default_rng(seed)
    digits = rng.integers(0, 10, n)
    ids = [f"mnist-inrs/mnist_png_{'training' if i < 40 else 'testing'}_{d}_{i}/checkpoints/model_final.pth"
           for i, d in enumerate(digits)]
    perm = rng.permutation(n)
    meta = pd.DataFrame({"id": [ids[i] for i in perm], "arch": 0})
    return meta, digits[perm], ids, digits


def write_inr_split(path, ids, digits, prefix):
    """The published format: {split: {"path": [...], "label": [...]}}, authors' paths, string labels."""
    parts = {"train": range(0, 32), "val": range(32, 40), "test": range(40, len(ids))}
    data = {name: {"path": [prefix + ids[i] for i in ix], "label": [str(digits[i]) for i in ix]}
            for name, ix in parts.items()}
    path.write_text(json.dumps(data))
    return parts


CLUSTER = "/scratch/kofinas/neural-graphs/experiments/inr_classification/dataset/"  # an authors' absolute path


@pytest.mark.parametrize("prefix", ["", CLUSTER])
def test_inr_official_split_matches_paths(tmp_path, prefix):
    meta, labels, ids, digits = mnist_zoo()
    parts = write_inr_split(tmp_path / "mnist_splits.json", ids, digits, prefix)
    split = inr_official_split(tmp_path / "mnist_splits.json", meta, labels=labels)
    for name, ix in parts.items():
        assert [meta["id"][r] for r in split[name]] == [ids[i] for i in ix]
        assert labels[split[name]].tolist() == digits[list(ix)].tolist()
    assert_partition(split, len(meta))


def test_inr_official_split_fmnist_layout(tmp_path):
    # fmnist_splits.json: "fmnist_inrs/{train,test}/model_<i>.pth" with integer labels; here the packed ids
    # carry an extra leading folder, which must not matter
    ids = [f"extracted/fmnist_inrs/{'train' if i < 8 else 'test'}/model_{i}.pth" for i in range(10)]
    meta = pd.DataFrame({"id": ids, "arch": 0})
    labels = np.arange(10) % 3
    path = [f"fmnist_inrs/train/model_{i}.pth" for i in range(8)] + ["fmnist_inrs/test/model_8.pth",
                                                                       "fmnist_inrs/test/model_9.pth"]
    data = {"train": {"path": path[:6], "label": [i % 3 for i in range(6)]},
            "val": {"path": path[6:8], "label": [0, 1]},
            "test": {"path": path[8:], "label": [2, 0]}}
    (tmp_path / "fmnist_splits.json").write_text(json.dumps(data))
    split = inr_official_split(tmp_path / "fmnist_splits.json", meta, labels=labels)
    assert split == {"train": [0, 1, 2, 3, 4, 5], "val": [6, 7], "test": [8, 9]}
    # same file names under the other folder are a different model, not a match
    data["test"]["path"][0] = "fmnist_inrs/train/model_8.pth"
    (tmp_path / "fmnist_splits.json").write_text(json.dumps(data))
    with pytest.raises(ProbegenError, match="fmnist_inrs/train/model_8.pth is not in the packed zoo"):
        inr_official_split(tmp_path / "fmnist_splits.json", meta)


def test_inr_split_naming_a_missing_model(tmp_path):
    meta, labels, ids, digits = mnist_zoo()
    write_inr_split(tmp_path / "mnist_splits.json", ids, digits, "")
    kept = meta[meta["id"] != ids[45]].reset_index(drop=True)  # e.g. dropped for NaN weights
    with pytest.raises(ProbegenError) as err:
        inr_official_split(tmp_path / "mnist_splits.json", kept)
    assert str(err.value) == f"{tmp_path / 'mnist_splits.json'}: {ids[45]} is not in the packed zoo"


def test_inr_split_label_mismatch(tmp_path):
    meta, labels, ids, digits = mnist_zoo()
    write_inr_split(tmp_path / "mnist_splits.json", ids, digits, "")
    wrong = labels.copy()
    wrong[0] = (wrong[0] + 1) % 10
    with pytest.raises(ProbegenError, match="has label"):
        inr_official_split(tmp_path / "mnist_splits.json", meta, labels=wrong)


def test_wild_park_official_split(tmp_path):
    ids = [f"cifar10_zooV2/trial_{t}/checkpoint_{c:06d}/checkpoint.pt" for t in range(6) for c in range(3)]
    meta = pd.DataFrame({"id": ids[::-1], "arch": 0})
    runs = {"train": [0, 1, 2, 3], "val": [4], "test": [5]}
    data = {name: {"path": [ids[3 * t + c] for t in ts for c in range(3)],
                   "score": [0.5] * 3 * len(ts), "step": [c for _ in ts for c in range(3)]}
            for name, ts in runs.items()}
    (tmp_path / "cnn_park_splits.json").write_text(json.dumps(data))
    split = wild_park_official_split(tmp_path / "cnn_park_splits.json", meta)
    assert_partition(split, len(ids))
    assert {meta["id"][r].split("/")[1] for r in split["test"]} == {"trial_5"}
    data["val"]["path"].append("cifar10_zooV2/trial_9/checkpoint_000000/checkpoint.pt")
    data["val"]["score"].append(0.1)
    data["val"]["step"].append(0)
    (tmp_path / "cnn_park_splits.json").write_text(json.dumps(data))
    with pytest.raises(ProbegenError, match="cnn_park_splits.json: cifar10_zooV2/trial_9/.* not in the packed"):
        wild_park_official_split(tmp_path / "cnn_park_splits.json", meta)


def test_malformed_split_files(tmp_path):
    meta, _, _, _ = mnist_zoo()
    with pytest.raises(ProbegenError, match="nope.json: no such split file"):
        inr_official_split(tmp_path / "nope.json", meta)
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(ProbegenError, match="s.json: not valid JSON"):
        inr_official_split(tmp_path / "s.json", meta)
    (tmp_path / "s.json").write_text(json.dumps({"train": {"path": [], "label": []}}))
    with pytest.raises(ProbegenError, match="s.json: expected \\{'val'"):
        inr_official_split(tmp_path / "s.json", meta)


# -----------------------------------------------------------------------------
# dispatch, save, load

def test_make_split_save_and_load(tmp_path):
    meta, labels, ids, digits = mnist_zoo()
    zoo = PackedZoo(tmp_path, ragged(np.zeros(len(meta) * 4), [4] * len(meta)), labels, meta,
                    {"task": "classification", "family": "siren"})
    split = make_split("deterministic", zoo, val=0.2, test=0.2, seed=0)
    assert_partition(split, len(meta))
    write_inr_split(tmp_path / "mnist_splits.json", ids, digits, "")
    official = make_split("inr_official", zoo, split_file=tmp_path / "mnist_splits.json")
    assert len(official["test"]) == 20
    save_split(tmp_path / "split.json", official)
    assert load_split(tmp_path / "split.json", num_models=len(meta)) == official
    with pytest.raises(ProbegenError, match="needs an official split file"):
        make_split("wild_park_official", zoo)
    with pytest.raises(ProbegenError, match="split kind: expected one of"):
        make_split("random", zoo)
    with pytest.raises(ProbegenError, match="names a row >= 10"):
        load_split(tmp_path / "split.json", num_models=10)
    (tmp_path / "bad.json").write_text(json.dumps({"train": [0, 1], "val": [1], "test": []}))
    with pytest.raises(ProbegenError, match="model 1 is in both train and val"):
        load_split(tmp_path / "bad.json")


def test_build_split_stage(tmp_path):
    meta, labels, ids, digits = mnist_zoo()
    spec = {"family": "siren", "task": "classification", "num_classes": 10, "format": "dwsnets_inr"}
    d = num_params("siren", DWSNETS_ARCH)
    with PackedWriter(tmp_path / "zoos" / "mnist_inr", capacity=len(meta), total_params=len(meta) * d,
                      spec=spec) as w:
        w.add(np.ones((len(meta), d)), labels, [{} for _ in ids], [DWSNETS_ARCH] * len(meta), list(meta["id"]))
    write_inr_split(tmp_path / "mnist_splits.json", ids, digits, CLUSTER)
    cfg = SplitConfig("inr_official", url=str(tmp_path / "mnist_splits.json"))
    sizes = build_split(cfg, tmp_path / "zoos" / "mnist_inr", tmp_path / "splits" / "mnist_inr.json",
                        cache_dir=tmp_path / "downloads")
    assert sizes == {"train": 32, "val": 8, "test": 20}
    split = load_split(tmp_path / "splits" / "mnist_inr.json", num_models=len(meta))
    assert [meta["id"][r] for r in split["val"]] == ids[32:40]
    sizes = build_split(SplitConfig("deterministic", 0.25, 0.25, 0), tmp_path / "zoos" / "mnist_inr",
                        tmp_path / "splits" / "det.json")
    assert sum(sizes.values()) == len(meta) and 12 <= sizes["val"] <= 18


def test_the_small_cnn_split_keeps_the_checkpoints_the_packed_zoo_kept(tmp_path):
    """split@ reads the step to keep from the packed zoo's spec (zoo.<name>.pack.final_step), not a default."""
    runs = 200
    order = write_order_file(tmp_path / "order.csv", runs * 9, seed=3)
    steps = np.tile(SMALL_CNN_STEPS, runs)
    meta = pd.DataFrame({"row": np.arange(runs * 9), "step": steps})
    zoo = lambda final_step: PackedZoo(tmp_path, ragged(np.zeros(len(meta)), [1] * len(meta)), np.zeros(len(meta)),
                                       meta, {"task": "regression", "family": "small_cnn", "final_step": final_step})
    at_40 = make_split("small_cnn_official", zoo(40), split_file=order)
    rows = at_40["train"] + at_40["val"] + at_40["test"]
    assert sorted(rows) == np.flatnonzero(steps == 40).tolist()
    assert at_40 == small_cnn_official_split(order, meta, final_step=40)
    every = make_split("small_cnn_official", zoo(None), split_file=order)  # packed with each run's last: all rows
    assert sorted(every["train"] + every["val"] + every["test"]) == list(range(len(meta)))  # each row once

"""The published zoos end to end, offline, through `dvc exp run -S 'zoos=[...]'`.

Tiny zoos are written in the published layouts and archived as published (mnist-inrs.zip, cifar10.tar.xz,
cnn_wild_park.zip), with official split files in the published formats (mnist_splits.json,
nfn_cifar10_split.csv, cnn_park_splits.json). A server on 127.0.0.1 serves them at the paths of the real
URLs in params.yaml (only scheme and host differ), so the real download code fetches them.

The whole pipeline (fetch@ -> pack@ -> split@ -> probe@ / weights@ of every method -> localize@ -> aggregate)
runs on the INR zoo and on Wild Park, the CNN zoo with the most of its own code (mixed architectures,
residuals, OmegaConf configs, a split by run). The Small CNN Zoo goes through fetch@, pack@ and split@, where
its own code is (tar.xz, TF layout, NFN's order file): its networks train through the same small_cnn family
as the embedded digits_cnn (test_pipeline.py), and every training stage costs ~3.5 s of start-up on 2 cores.
"""

import hashlib
import io
import json
import random
import re
import tarfile
import urllib.parse
import zipfile
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import make_project, run, tiny_params
from http_fixture import serve
from probegen.methods import METHODS as METHOD_REGISTRY
from probegen.nets import siren
from probegen.nets import wild_park as wp
from probegen.zoo.formats import dwsnets_inr, small_cnn_zoo
from probegen.zoo.formats import wild_park as wild_park_format
from probegen.zoo.packed import load_packed

pytestmark = pytest.mark.slow

ZOOS = ["mnist_inr", "wild_park"]  # the whole pipeline; cifar10_gs up to split@ (see above)
PUBLISHED = ["mnist_inr", "cifar10_gs", "wild_park"]
# a probing method, statistics, an equivariant network (on the INRs; skipped on Wild Park, which is not an
# MLP weight space) and a graph network (both, Wild Park's mixed architectures in one batch)
METHODS = {"probe": ["probegen"], "weights": ["statnn", "dwsnets", "ng_gnn"]}
SKIPPED = {("wild_park", "dwsnets")}
SMALL_CNN_STEPS = (0, 1, 2, 3, 20, 40, 60, 80, 86)  # the 9 checkpoints of every Small CNN Zoo run
WRONG_SHA = "bad0" * 16  # has letters, so `-S ...sha256=` keeps it a string


def sha(data):
    return hashlib.sha256(data).hexdigest()


# -----------------------------------------------------------------------------
# the zoos, in the published layouts

def mnist_inr_zoo(tmp_path, n=40, n_test=10):
    """DWSNets' MNIST INRs (mnist-inrs/mnist_png_<training|testing>_<digit>_<id>/checkpoints/model_final.pth,
    random weights) and mnist_splits.json as neural-graphs' generate_mnist_data_splits.py writes it:
    paths relative to its dataset folder, labels as strings, val cut from the training folders."""
    rng = np.random.default_rng(0)
    files, labels = {}, {}
    for i in range(n):
        kind, digit = ("testing" if i < n_test else "training"), int(rng.integers(10))
        rel = f"mnist-inrs/mnist_png_{kind}_{digit}_{1000 + i}/checkpoints/model_final.pth"
        row = torch.from_numpy(rng.normal(0, 0.2, 1185).astype(np.float32))
        dwsnets_inr.write_checkpoint(tmp_path / rel, siren.state_dict(siren.DWSNETS_ARCH, row))
        files[rel], labels[rel] = (tmp_path / rel).read_bytes(), digit
    test, training = list(files)[:n_test], list(files)[n_test:]
    rng.shuffle(training)
    parts = {"train": training[6:], "test": test, "val": training[:6]}
    split = {name: {"path": ps, "label": [str(labels[p]) for p in ps]} for name, ps in parts.items()}
    return zip_bytes(files), json.dumps(split).encode(), SimpleNamespace(parts=parts, labels=labels)


def cifar10_gs_zoo(tmp_path, n_runs=32):
    """The Small CNN Zoo (cifar10.tar.xz: cifar10/{weights.npy, metrics.csv.gz, layout.csv}, 9 checkpoints
    per run, run-major rows, TF layout) and NFN's order file (a permutation of the weights.npy rows under a
    stray pandas header "0")."""
    rng = np.random.default_rng(1)
    n = n_runs * len(SMALL_CNN_STEPS)
    per_run = lambda values: np.repeat(values, len(SMALL_CNN_STEPS))  # noqa: E731
    metrics = pd.DataFrame({
        "config.activation": per_run(np.resize(["relu", "tanh"], n_runs)),
        "config.dropout": per_run(rng.uniform(0, 0.7, n_runs)), "config.init_std": 0.05,
        "config.l2reg": 1e-4, "config.learning_rate": 5e-3,
        "config.optimizer": per_run(rng.choice(["sgd", "adam", "rmsprop"], n_runs)),
        "config.train_fraction": 0.5, "config.w_init": "he_normal",
        "modeldir": per_run([f"/tmp/cifar10/run_{r}" for r in range(n_runs)]),
        "step": np.tile(SMALL_CNN_STEPS, n_runs),
        "test_accuracy": rng.uniform(0.1, 0.6, n), "train_accuracy": rng.uniform(0.1, 0.7, n)})
    weights = (rng.standard_normal((n, small_cnn_zoo.NUM_PARAMS)) * 0.2).astype(np.float32)
    small_cnn_zoo.write_zoo(tmp_path / "cifar10", weights, metrics)
    archive = tmp_path / "cifar10.tar.xz"
    with tarfile.open(archive, "w:xz", preset=1) as tf:
        tf.add(tmp_path / "cifar10", arcname="cifar10")
    order = rng.permutation(n)
    order_csv = ("0\n" + "\n".join(map(str, order)) + "\n").encode()
    return archive.read_bytes(), order_csv, SimpleNamespace(order=order, metrics=metrics)


WILD_PARK_ARCHS = [  # (channels, kernel sizes, residual sources, activations): two runs each
    ([4, 4, 4], [3, 5, 3], [-1, -1, 0], ["relu", "gelu", "tanh"]),  # a residual connection
    ([4, 8], [3, 3], [-1, -1], ["leaky_relu", "sigmoid"]),
    ([8, 4, 4], [5, 3, 3], [-1, -1, 0], ["tanh", "none", "relu"]),  # residual from 8 onto 4 channels
]


def wild_park_zoo(tmp_path, steps=(4, 12)):
    """CNN Wild Park (cnn_wild_park.zip: cifar10_zooV2/<trial>/checkpoint_<N>/checkpoint.pt with an OmegaConf
    config, random weights) and cnn_park_splits.json as generate_cnn_park_splits.py writes it: split by
    run, {split: {path, score, step}}, each list shuffled."""
    rng = np.random.default_rng(2)
    files, records = {}, {}  # path -> bytes; path -> (run, step, score)
    for run_index in range(2 * len(WILD_PARK_ARCHS)):
        channels, kernels, residual, activation = WILD_PARK_ARCHS[run_index // 2]
        arch = wp.check_arch({"in_channels": 3, "channels": channels, "kernel_size": kernels,
                              "stride": [1] * len(kernels), "padding": [k // 2 for k in kernels],
                              "residual": residual, "activation": activation, "num_classes": 10})
        for step in steps:
            torch.manual_seed(100 * run_index + step)
            rel = f"cifar10_zooV2/NN_tune_trainable_{run_index:05d}/checkpoint_{step:06d}/checkpoint.pt"
            records[rel] = (run_index, step, float(rng.uniform(0.1, 0.6)))
            wild_park_format.write_checkpoint(tmp_path / rel, wp.WildParkCNN(arch).state_dict(), wp.to_config(arch),
                                              records[rel][2], as_omegaconf=True, iteration=step)
            files[rel] = (tmp_path / rel).read_bytes()
    runs = {"train": [0, 2, 3, 4], "val": [5], "test": [1]}
    parts = {name: [p for p in files if records[p][0] in rs] for name, rs in runs.items()}
    for paths in parts.values():
        rng.shuffle(paths)
    split = {name: {"path": ps, "score": [records[p][2] for p in ps], "step": [records[p][1] for p in ps]}
             for name, ps in parts.items()}
    score = {p: r[2] for p, r in records.items()}
    return zip_bytes(files), json.dumps(split).encode(), SimpleNamespace(parts=parts, score=score)


def zip_bytes(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)  # 1980: same bytes
    return buf.getvalue()


# -----------------------------------------------------------------------------
# the project: tiny params, every published URL pointing at the local server

def served_at(url, server):
    """The published URL with 127.0.0.1 for its host: same path, so the same archive / split file name."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(("http", server.url.split("//")[1], parts.path, parts.query, ""))


def published_params(server):
    """tiny_params() (embedded zoos still the default `zoos`) with the published zoos served locally."""
    params = tiny_params(methods=METHODS)
    for zoo in PUBLISHED:
        params["zoo"][zoo]["fetch"]["url"] = served_at(params["zoo"][zoo]["fetch"]["url"], server)
        params["split"][zoo]["url"] = served_at(params["split"][zoo]["url"], server)
        # a few optimizer steps and evaluations per run: the point is the plumbing, not the scores
        params["train"][zoo] = {"epochs": 2, "batch_size": 8, "eval_every": 2}
    return params


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server, holding every archive and split file at its params.yaml path; and the fixtures' truth."""
    tmp_path = tmp_path_factory.mktemp("zoos")
    built = {"mnist_inr": mnist_inr_zoo(tmp_path / "inr"), "cifar10_gs": cifar10_gs_zoo(tmp_path / "cnn"),
             "wild_park": wild_park_zoo(tmp_path / "wp")}
    with serve() as server:
        params, zoos = published_params(server), {}
        for zoo, (archive, split_file, truth) in built.items():
            archive_path = urllib.parse.urlsplit(params["zoo"][zoo]["fetch"]["url"]).path
            split_path = urllib.parse.urlsplit(params["split"][zoo]["url"]).path
            server.files[archive_path], server.files[split_path] = archive, split_file
            zoos[zoo] = SimpleNamespace(archive=archive, archive_path=archive_path, split_path=split_path,
                                        truth=truth)
        yield SimpleNamespace(server=server, zoos=zoos)


@pytest.fixture(scope="module")
def published(served, tmp_path_factory):
    """One `dvc exp run` of the whole pipeline on the INR and Wild Park zoos."""
    repo = make_project(tmp_path_factory.mktemp("published") / "repo", published_params(served.server))
    # `aggregate` as the target: everything the results need (the tiny induction stage included)
    proc = run(f"dvc exp run -S 'zoos=[{','.join(ZOOS)}]' aggregate", repo)
    return SimpleNamespace(repo=repo, out=proc.stdout + proc.stderr, requests=list(served.server.requests))


def gets(requests, path):
    return [r for r in requests if r[0].split("?")[0] == path]


def stages_run(out):
    return re.findall(r"^Running stage '([^']+)'", out, flags=re.M)


def split_ids(repo, zoo, column="id"):
    """data/splits/<zoo>.json as the packed models' ids (or another meta column), in the split's order."""
    meta = load_packed(repo / f"data/zoos/{zoo}").meta
    split = json.loads((repo / f"data/splits/{zoo}.json").read_text())
    return {name: [meta[column][r] for r in rows] for name, rows in split.items()}


# -----------------------------------------------------------------------------
# the whole pipeline on the INR zoo and Wild Park

def test_every_method_ran_on_every_zoo(published):
    repo = published.repo
    assert yaml.safe_load((repo / "params.yaml").read_text())["zoos"] == ZOOS
    assert not (repo / "data/raw/digits_inr").exists()  # the embedded default was not built
    methods = METHODS["probe"] + METHODS["weights"]
    for zoo in ZOOS:
        for method in methods:
            run_dir = repo / f"models/{zoo}/{method}"
            if (zoo, method) in SKIPPED:
                reason = json.loads((run_dir / "skipped.json").read_text())["skipped"]
                assert reason == METHOD_REGISTRY[method].why_unsupported("wild_park")
                continue
            metrics = json.loads((run_dir / "seed-0.json").read_text())
            assert metrics["zoo"] == zoo and metrics["method"] == method and np.isfinite(metrics["test"])
        localize = json.loads((repo / f"metrics/localize/{zoo}.json").read_text())
        assert localize["zoo"] == zoo and localize["num_probes"] == 4

    summary = json.loads((repo / "metrics/summary.json").read_text())
    # aggregate reads metrics/induction.json, so the (tiny) induction stage ran too
    assert set(summary) == set(ZOOS) | {"localize", "induction"} and set(summary["localize"]) == set(ZOOS)
    details = json.loads((repo / "metrics/details.json").read_text())
    for zoo, metric in (("mnist_inr", "accuracy"), ("wild_park", "kendall_tau")):
        assert set(summary[zoo]) == set(methods)
        assert all((summary[zoo][m]["test"] is None) == ((zoo, m) in SKIPPED) for m in methods)
        assert {details[zoo][m]["metric"] for m in methods if (zoo, m) not in SKIPPED} == {metric}

    # DVC recorded one experiment, with the new zoo list and these results
    exps = json.loads(run("dvc exp show --json", repo).stdout)
    found = [e for commit in exps for e in (commit.get("experiments") or [])]
    assert len(found) == 1
    data = found[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["zoos"] == ZOOS
    shown = data["metrics"]["metrics/summary.json"]["data"]
    assert shown["wild_park"]["statnn"]["test"] == summary["wild_park"]["statnn"]["test"]


def test_packed_zoos_hold_the_published_models_and_labels(published, served):
    inr = load_packed(published.repo / "data/zoos/mnist_inr")
    labels = served.zoos["mnist_inr"].truth.labels  # the digit in each folder name
    assert sorted(inr.meta["id"]) == sorted(labels)
    assert inr.labels.tolist() == [labels[i] for i in inr.meta["id"]]

    park = load_packed(published.repo / "data/zoos/wild_park")
    score = served.zoos["wild_park"].truth.score  # last_result['test/acc'] of each checkpoint
    assert sorted(park.meta["id"]) == sorted(score) and len(park.archs) == len(WILD_PARK_ARCHS)
    assert park.labels.tolist() == [np.float32(score[i]) for i in park.meta["id"]]
    assert any(r >= 0 for arch in park.archs for r in arch["residual"])


def test_splits_are_the_served_official_ones(published, served):
    for zoo in ZOOS:  # both split files name models by path: the same models, in the same order
        assert split_ids(published.repo, zoo) == served.zoos[zoo].truth.parts, zoo


def test_unpinned_downloads_record_and_print_the_observed_sha256(published, served):
    for zoo in ZOOS:
        z = served.zoos[zoo]
        assert len(gets(published.requests, z.archive_path)) == 1, zoo  # one GET each, no retries
        assert len(gets(published.requests, z.split_path)) == 1, zoo
        name = z.archive_path.rsplit("/", 1)[1]
        sidecar = json.loads((published.repo / f"data/downloads/{name}.sha256.json").read_text())
        assert sidecar["sha256"] == sha(z.archive) and sidecar["size"] == len(z.archive)
        assert f"observed sha256={sha(z.archive)}" in published.out


def test_rerun_and_pinning_the_sha256_download_nothing(published, served):
    repo, before = published.repo, len(served.server.requests)
    assert stages_run(run("dvc exp run aggregate", repo).stdout) == ["check"]  # always_changed, cheap
    # pinning the recorded checksum (the README's advice) reruns fetch@, which verifies the kept download;
    # the extracted zoo is unchanged, so nothing downstream reruns
    observed = sha(served.zoos["wild_park"].archive)
    out = run(f"dvc exp run -S zoo.wild_park.fetch.sha256={observed} aggregate", repo).stdout
    assert stages_run(out) == ["check", "fetch@wild_park"] and "no sha256 pinned" not in out
    assert served.server.requests[before:] == []  # neither an archive nor a split file fetched again
    assert set(json.loads(run("dvc status --json aggregate", repo).stdout)) <= {"check"}  # always_changed


# -----------------------------------------------------------------------------
# the Small CNN Zoo, and a wrong checksum

def test_small_cnn_zoo_is_fetched_packed_and_split_as_published(served, tmp_path):
    repo = make_project(tmp_path / "repo", published_params(served.server))
    run("dvc exp run -S 'zoos=[cifar10_gs]' split@cifar10_gs", repo)
    truth = served.zoos["cifar10_gs"].truth
    packed = load_packed(repo / "data/zoos/cifar10_gs")
    final = np.flatnonzero(truth.metrics["step"] == 86)
    assert packed.meta["row"].tolist() == final.tolist()  # the final checkpoints, by weights.npy row
    np.testing.assert_array_equal(packed.labels, truth.metrics["test_accuracy"].to_numpy(np.float32)[final])

    # NFN's NFNZooDataset: the final checkpoints in the order file's order; the second half is test, the
    # first half is shuffled with random.Random(0) and cut 80/20 into train / val
    ordered = [int(r) for r in truth.order if r in set(final)]
    half = len(ordered) // 2
    trainval = list(range(half))
    random.Random(0).shuffle(trainval)
    cut = int(0.8 * half)
    expected = {"train": [ordered[i] for i in trainval[:cut]], "val": [ordered[i] for i in trainval[cut:]],
                "test": ordered[half:]}
    assert split_ids(repo, "cifar10_gs", column="row") == expected


def test_wrong_pinned_sha256_is_one_error_line_and_no_output(served, tmp_path):
    zoo = served.zoos["wild_park"]
    repo = make_project(tmp_path / "repo", published_params(served.server))
    proc = run(f"dvc exp run -S 'zoos=[wild_park]' -S zoo.wild_park.fetch.sha256={WRONG_SHA} fetch@wild_park",
               repo, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    assert "cnn_wild_park.zip" in errors[0] and WRONG_SHA in errors[0] and sha(zoo.archive) in errors[0]
    assert list(repo.glob("data/raw/*")) == []  # nothing extracted, not even a temporary folder
    assert list((repo / "data/downloads").iterdir()) == []  # neither the archive nor a .part kept

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from probegen.nets import forward_zoo, small_cnn
from probegen.zoo.embedded import digits_cnn
from probegen.zoo.formats import small_cnn_zoo
from probegen.zoo.packed import load_packed

# The Small CNN Zoo README's metrics.csv.gz columns, in its order.
PUBLISHED_COLUMNS = [
    "config.activation", "config.b_init", "config.dataset", "config.dnn_architecture", "config.dropout",
    "config.epochs", "config.epochs_between_checkpoints", "config.init_std", "config.l2reg",
    "config.learning_rate", "config.num_layers", "config.num_units", "config.optimizer",
    "config.random_seed", "config.train_fraction", "config.w_init", "modeldir", "step", "test_accuracy",
    "test_loss", "train_accuracy", "train_loss"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The forwards and steps here are small: a second intra-op thread adds synchronization to every
    # tiny op and stalls whenever the machine is busy (build() does the same for its groups).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_cnn")
    summary = digits_cnn.build(root / "raw", num_runs=16, epochs=2, seed=0, batch_size=32, progress=False)
    small_cnn_zoo.pack(root / "raw", root / "packed", final_step=summary["final_step"], progress=False)
    return root, summary


def test_last_checkpoints_are_the_final_step(tiny):
    root, _ = tiny
    small_cnn_zoo.pack(root / "raw", root / "last", final_step=None, progress=False)
    last, packed = load_packed(root / "last"), load_packed(root / "packed")
    assert last.meta["row"].tolist() == packed.meta["row"].tolist() == [3 * i + 2 for i in range(16)]


def test_heldout_digits_are_fixed_and_never_trained_on():
    x, y = digits_cnn.heldout_digits()
    x_tr, y_tr = digits_cnn.train_digits()
    assert x.shape == (539, 1, 32, 32) and x_tr.shape == (1258, 1, 32, 32)
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.99 and x.max() > 0.99
    _, _, heldout = digits_cnn._digits()
    assert heldout.sum() == 539  # one mask splits the 1,797 digits: disjoint by construction
    assert np.bincount(y.numpy()).tolist() == [53, 55, 53, 55, 54, 55, 54, 54, 52, 54]  # 30% per digit
    x2, y2 = digits_cnn.heldout_digits()
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_tiny_build_is_a_small_cnn_zoo(tiny):
    root, summary = tiny
    metrics = pd.read_csv(root / "raw" / "metrics.csv.gz")
    weights = np.load(root / "raw" / "weights.npy", mmap_mode="r")
    assert list(metrics.columns) == PUBLISHED_COLUMNS
    assert weights.shape == (16 * 3, 4970) and len(metrics) == 48
    assert summary["final_step"] == 2 and summary["checkpoint_steps"] == [0, 1, 2]
    assert metrics["step"].tolist() == [0, 1, 2] * 16  # run by run, as the published rows
    assert metrics["modeldir"].nunique() == 16
    assert set(metrics["config.optimizer"]) <= {"sgd", "adam", "rmsprop"}
    assert set(metrics["config.w_init"]) <= set(digits_cnn.W_INITS)
    assert set(metrics["config.train_fraction"]) <= {0.1, 0.25, 0.5, 1.0}
    assert metrics["config.learning_rate"].between(5e-4, 5e-2).all()
    assert metrics["config.dropout"].between(0, 0.7).all()
    saved = json.loads((root / "raw" / "build_summary.json").read_text())
    assert saved["num_runs"] == 16 and saved["final_step"] == 2
    # Init checkpoints are chance-level; training moves at least some runs well above it.
    final = metrics.loc[metrics["step"] == 2, "test_accuracy"]
    assert metrics.loc[metrics["step"] == 0, "test_accuracy"].max() < 0.3 and final.max() > 0.4


def test_packed_weights_recompute_every_recorded_accuracy(tiny):
    root, _ = tiny
    packed = load_packed(root / "packed")
    assert len(packed) == 16 and (packed.meta["step"] == 2).all()
    x, y = digits_cnn.heldout_digits()
    logits = forward_zoo("small_cnn", packed.archs, torch.tensor(packed.arch_ids),
                         packed.weights[:], x)  # (16, 539, 10)
    correct = (logits.argmax(-1) == y).sum(1).numpy()
    np.testing.assert_array_equal(correct, np.rint(packed.labels * len(y)).astype(int))
    assert len(set(correct.tolist())) > 8  # the runs differ


def test_build_is_deterministic_for_a_seed(tmp_path):
    # Same seed: same bytes, whether the groups train one after the other or side by side.
    for name, seed, workers in (("a", 5, 1), ("b", 5, 3), ("c", 6, 1)):
        digits_cnn.build(tmp_path / name, num_runs=6, epochs=1, seed=seed, batch_size=32, workers=workers,
                         progress=False)
    for name in ("weights.npy", "metrics.csv.gz", "layout.csv", "build_summary.json"):  # every byte, timing-free
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "weights.npy").read_bytes() != (tmp_path / "c" / "weights.npy").read_bytes()


def keras_adam(params, lr, state=None):
    """Keras' Adam, written out for one model: lr_t = lr sqrt(1 - b2^t) / (1 - b1^t), p -= lr_t m / (sqrt(v) + eps).
    (torch.optim.Adam puts eps after the bias correction, which differs for near-zero gradients.)"""
    state = state or {"t": 0, "m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params]}
    state["t"] += 1
    t = state["t"]
    lr_t = lr * (1 - 0.999 ** t) ** 0.5 / (1 - 0.9 ** t)
    with torch.no_grad():
        for p, m, v in zip(params, state["m"], state["v"]):
            m.copy_(0.9 * m + 0.1 * p.grad)
            v.copy_(0.999 * v + 0.001 * p.grad ** 2)
            p -= lr_t * m / (v.sqrt() + 1e-7)
    return state


def test_batched_optimizers_match_per_run_references():
    """Three runs trained in one batch (SGD, Adam, RMSProp; own lr and L2) equal three plain runs."""
    arch = small_cnn.zoo_arch("tanh")
    hp = pd.DataFrame({"config.optimizer": ["sgd", "adam", "rmsprop"], "config.learning_rate": [0.05, 0.01, 0.003],
                       "config.l2reg": [1e-3, 0.0, 1e-2], "config.dropout": 0.0, "config.init_std": 0.1,
                       "config.w_init": ["he_normal", "orthogonal", "RandomNormal"]})
    x_tr, y_tr = digits_cnn.train_digits()
    runs = digits_cnn.Runs(arch, hp, torch.arange(64), torch.Generator().manual_seed(0), "cpu")
    refs = [small_cnn.reference_module(arch, row) for row in runs.rows()]
    sgd = torch.optim.SGD(refs[0].parameters(), lr=0.05)
    rmsprop = torch.optim.RMSprop(refs[2].parameters(), lr=0.003, alpha=0.9, eps=1e-7)  # Keras' defaults
    adam_state, gen = None, torch.Generator().manual_seed(1)
    for step in range(4):
        idx = torch.arange(step * 8, step * 8 + 8)
        runs.step(x_tr[idx], y_tr[idx], gen)
        for ref, l2 in zip(refs, hp["config.l2reg"]):
            ref.zero_grad()
            loss = F.cross_entropy(ref(x_tr[idx]), y_tr[idx])
            loss = loss + l2 * sum(p.pow(2).sum() for n, p in ref.named_parameters() if n.endswith("weight"))
            loss.backward()
        sgd.step()
        rmsprop.step()
        adam_state = keras_adam(list(refs[1].parameters()), 0.01, adam_state)
    for row, ref in zip(runs.rows(), refs):
        flat = torch.cat([p.detach().flatten() for p in ref.parameters()])
        torch.testing.assert_close(row, flat, atol=2e-5, rtol=0)


def test_keras_initializers():
    n = 30
    hp = pd.DataFrame({"config.w_init": np.repeat(digits_cnn.W_INITS, n), "config.init_std": 0.02})
    w = digits_cnn.init_params(small_cnn.zoo_arch("relu"), hp, torch.Generator().manual_seed(0))[2]
    kernels = w.permute(0, 3, 4, 2, 1).reshape(len(hp), 144, 16)  # conv2 as Keras' (H*W*in, out) matrices
    std = kernels.flatten(1).std(1).view(5, n).mean(1)
    expected = [(2 / 144) ** 0.5, 1 / 12, (2 / 288) ** 0.5, 0.02, 0.02 * digits_cnn.TRUNC_STD]
    np.testing.assert_allclose(std.numpy(), expected, rtol=0.05)
    ortho = kernels[n:2 * n]
    torch.testing.assert_close(ortho.transpose(1, 2) @ ortho, torch.eye(16).expand(n, 16, 16), atol=1e-5, rtol=0)
    trunc = kernels[4 * n:]
    assert trunc.abs().max() <= 2 * 0.02 + 1e-7

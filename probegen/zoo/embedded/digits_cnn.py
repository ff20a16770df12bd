"""The embedded digits_cnn zoo: a small Small CNN Zoo, trained here on sklearn's digits, offline.

Every run is the exact Small CNN Zoo network (probegen/nets/small_cnn.py) trained on load_digits images
upsampled to 32x32 (bilinear) and scaled to [-1, 1], with hyper-parameters sampled as Unterthiner et al.
sampled them (the ranges of google-research's dnn_predict_accuracy / approxNN code):

    optimizer      sgd | adam | rmsprop (Keras defaults: no momentum; Adam 0.9/0.999; RMSProp rho 0.9; eps 1e-7)
    learning_rate  log-uniform [5e-4, 5e-2]
    l2reg          log-uniform [1e-8, 1e-2]   (Keras kernel_regularizer: + l2 * sum(kernel^2), kernels only)
    dropout        uniform [0, 0.7]           (after every conv activation)
    init_std       log-uniform [1e-3, 0.5]    (used by RandomNormal / TruncatedNormal only, as in Keras)
    w_init         he_normal | orthogonal | glorot_normal | RandomNormal | TruncatedNormal; biases zero
    train_fraction 0.1 | 0.25 | 0.5 | 1.0
    activation     relu | tanh

A fixed 30% of the digits (stratified, the same for every build) is held out and never trained on; a
checkpoint's test_accuracy is its accuracy there. All runs train at once: parameters are stacked per run,
the forward is small_cnn's grouped convolution, and SGD / Adam / RMSProp, L2, dropout and the training
hyper-parameters are per-run tensors; runs are batched by (activation, train_fraction).

Checkpoints are taken at epochs 0 (init), epochs // 2 and epochs (rows run by run, as in the real zoo);
`step` is the epoch, as in the real zoo, so the final checkpoints have step == epochs: pack with
final_step = epochs (or final_step = None, each run's last checkpoint). The zoo is written by
small_cnn_zoo.write_zoo in the published format, so it goes through the real zoo's reader.
"""

import contextlib
import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from probegen.nets import small_cnn
from probegen.zoo.formats import small_cnn_zoo

HELDOUT_FRACTION = 0.3
HELDOUT_SEED = 20240  # fixed: the held-out digits do not depend on the build seed
TRAIN_EVAL_IMAGES = 256  # train_accuracy: on (up to) 256 of the run's own training images
# Models per evaluation forward (539 images x 16 models ~ 125 MB of layer-1 activations). Images are
# never split: a packed zoo probed with all held-out digits at once gets bit-identical logits.
EVAL_CHUNK = 16
OPTIMIZERS = ("sgd", "adam", "rmsprop")
W_INITS = ("he_normal", "orthogonal", "glorot_normal", "RandomNormal", "TruncatedNormal")
TRAIN_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
ACTIVATIONS = ("relu", "tanh")
BETA1, BETA2, RHO, EPS = 0.9, 0.999, 0.9, 1e-7  # Keras optimizer defaults
TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2] (Keras VarianceScaling)


# -----------------------------------------------------------------------------
# data

@functools.lru_cache(maxsize=1)
def _digits():
    """All 1,797 digits as (x (N, 1, 32, 32) in [-1, 1], y (N,)) and the fixed held-out mask."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False) * 2 - 1  # (N, 1, 32, 32)
    y = torch.tensor(d.target, dtype=torch.int64)
    rng = np.random.default_rng(HELDOUT_SEED)
    heldout = np.zeros(len(y), dtype=bool)
    for c in range(10):  # stratified: 30% of every digit
        idx = np.flatnonzero(d.target == c)
        heldout[rng.choice(idx, int(round(HELDOUT_FRACTION * len(idx))), replace=False)] = True
    return x, y, torch.from_numpy(heldout)


def heldout_digits():
    """The held-out digits every test_accuracy is measured on: (x (n, 1, 32, 32), y (n,)), n = 539."""
    x, y, heldout = _digits()
    return x[heldout], y[heldout]


def train_digits():
    """The digits runs train on (never the held-out ones): (x (m, 1, 32, 32), y (m,)), m = 1,258."""
    x, y, heldout = _digits()
    return x[~heldout], y[~heldout]


# -----------------------------------------------------------------------------
# hyper-parameters and initialization

def sample_hparams(num_runs, rng):
    """One row per run, in the metrics.csv.gz spelling."""
    def log_uniform(lo, hi):
        return np.exp(rng.uniform(np.log(lo), np.log(hi), num_runs))
    return pd.DataFrame({
        "config.activation": rng.choice(ACTIVATIONS, num_runs),
        "config.dropout": rng.uniform(0.0, 0.7, num_runs),
        "config.init_std": log_uniform(1e-3, 0.5),
        "config.l2reg": log_uniform(1e-8, 1e-2),
        "config.learning_rate": log_uniform(5e-4, 5e-2),
        "config.optimizer": rng.choice(OPTIMIZERS, num_runs),
        "config.train_fraction": rng.choice(TRAIN_FRACTIONS, num_runs),
        "config.w_init": rng.choice(W_INITS, num_runs),
    })


def init_params(arch, hp, gen):
    """Keras-style initial parameters for the runs of hp (B rows): [W, b] per layer, PyTorch layout, (B, ...)."""
    B = len(hp)
    w_init = torch.tensor([W_INITS.index(w) for w in hp["config.w_init"]])
    std = torch.tensor(hp["config.init_std"].to_numpy(), dtype=torch.float32)
    params = []
    for name, shape in small_cnn.param_shapes(arch):
        if name.endswith("bias"):
            params.append(torch.zeros(B, *shape))
            continue
        tf_shape = small_cnn_zoo.tf_shape(shape)
        receptive = int(np.prod(tf_shape[:-2]))  # Keras' _compute_fans: 3x3 for a conv kernel, 1 for dense
        fan_in, fan_out = receptive * tf_shape[-2], receptive * tf_shape[-1]
        scale = torch.stack([
            torch.full((B,), (2.0 / fan_in) ** 0.5 / TRUNC_STD),              # he_normal
            torch.ones(B),                                                     # orthogonal (gain 1)
            torch.full((B,), (2.0 / (fan_in + fan_out)) ** 0.5 / TRUNC_STD),  # glorot_normal
            std, std,                                                          # RandomNormal, TruncatedNormal
        ])[w_init, torch.arange(B)]  # (B,)
        normal = torch.randn(B, *tf_shape, generator=gen)
        trunc = _truncated_normal((B, *tf_shape), gen)
        ortho = _orthogonal(B, tf_shape, gen)
        pick = w_init.view(B, *[1] * len(tf_shape))
        w = torch.where(pick == 1, ortho, torch.where(pick == 3, normal, trunc))  # (B, *tf_shape)
        w = w * scale.view(B, *[1] * len(tf_shape))
        params.append(_tf_to_pt(w).contiguous())
    return params


def _truncated_normal(shape, gen):
    """Standard normal truncated to [-2, 2] (redrawn outside, as TF's truncated_normal)."""
    out = torch.randn(shape, generator=gen)
    bad = out.abs() > 2
    while bad.any():
        out[bad] = torch.randn(int(bad.sum()), generator=gen)
        bad = out.abs() > 2
    return out


def _orthogonal(B, tf_shape, gen):
    """Keras Orthogonal: QR of a Gaussian (rows = all but the last axis, cols = the last), sign-fixed."""
    rows, cols = int(np.prod(tf_shape[:-1])), tf_shape[-1]
    a = torch.randn(B, max(rows, cols), min(rows, cols), generator=gen)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)
    if rows < cols:
        q = q.transpose(1, 2)
    return q.reshape(B, *tf_shape)


def _tf_to_pt(w):
    """(B, *TF shape) -> (B, *PyTorch shape): conv (H, W, in, out) -> (out, in, H, W), dense (in, out) -> (out, in)."""
    return w.permute(0, 4, 3, 1, 2) if w.dim() == 5 else w.transpose(1, 2)


# -----------------------------------------------------------------------------
# batched training of a group of runs

class Runs:
    """The stacked parameters and optimizer state of B runs sharing an activation and a training subset."""

    def __init__(self, arch, hp, subset, gen, device):
        self.arch, self.hp, self.subset = arch, hp, subset.to(device)
        self.params = [p.to(device).requires_grad_() for p in init_params(arch, hp, gen)]
        self.is_kernel = [name.endswith("weight") for name, _ in small_cnn.param_shapes(arch)]
        def col(name):  # (B,) per-run hyper-parameter
            return torch.tensor(hp[name].to_numpy(), dtype=torch.float32, device=device)
        opt = torch.tensor([OPTIMIZERS.index(o) for o in hp["config.optimizer"]], device=device)
        self.lr, self.l2, self.keep = col("config.learning_rate"), col("config.l2reg"), 1 - col("config.dropout")
        # One update rule for all three optimizers, p -= lr_t * num / den, with per-run coefficients:
        #   sgd: num = g, den = 1;  rmsprop: num = g, den = sqrt(v) + eps;  adam: num = m, den = sqrt(v) + eps
        self.use_m = (opt == 1).float()
        self.use_v = (opt >= 1).float()
        self.decay_v = torch.where(opt == 1, BETA2, RHO).float()
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def layers(self):
        return list(zip(self.params[0::2], self.params[1::2]))

    def step(self, x, y, gen):
        """One optimizer step of every run on the shared batch x (K, 1, 32, 32), y (K,)."""
        B, K = len(self.hp), len(y)
        logits = small_cnn.apply(self.arch, self.layers(), x, keep=self.keep, generator=gen)  # (B, K, 10)
        loss = F.cross_entropy(logits.reshape(B * K, -1), y.repeat(B), reduction="none").view(B, K).mean(1)
        for p, kernel in zip(self.params, self.is_kernel):
            if kernel:
                loss = loss + self.l2 * p.pow(2).flatten(1).sum(1)  # (B,)
        # Runs are independent, so the gradient of the sum is every run's own gradient.
        grads = torch.autograd.grad(loss.sum(), self.params)
        self.t += 1
        with torch.no_grad():
            self._update(grads)

    def _update(self, grads):
        t = self.t
        # Adam's bias correction folded into its step size, as Keras does.
        lr_t = self.lr * (1 + self.use_m * ((1 - BETA2 ** t) ** 0.5 / (1 - BETA1 ** t) - 1))  # (B,)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            shape = (-1,) + (1,) * (p.dim() - 1)
            use_m, use_v, d = self.use_m.view(shape), self.use_v.view(shape), self.decay_v.view(shape)
            m.mul_(BETA1).add_(g, alpha=1 - BETA1)
            v.mul_(d).addcmul_(1 - d, g * g)
            num = use_m * m + (1 - use_m) * g
            den = use_v * (v.sqrt() + EPS) + (1 - use_v)
            p.sub_(lr_t.view(shape) * num / den)

    def rows(self):
        """(B, 4970) PyTorch-layout rows of the current parameters."""
        return torch.cat([p.detach().flatten(1) for p in self.params], dim=1)


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(arch, rows, x, y):
    """Eval-mode accuracy and mean cross-entropy of every model on (x, y): rows (B, D) -> two (B,) arrays.

    Models go through small_cnn.forward in chunks of EVAL_CHUNK, the forward a packed zoo is probed with.
    """
    correct, losses = [], []
    for start in range(0, len(rows), EVAL_CHUNK):
        logits = small_cnn.forward(arch, rows[start:start + EVAL_CHUNK], x)  # (b, n, 10)
        b = logits.shape[0]
        correct.append((logits.argmax(-1) == y).sum(1).double() / len(y))  # exact: count / n
        ce = F.cross_entropy(logits.reshape(b * len(y), -1), y.repeat(b), reduction="none")
        losses.append(ce.view(b, -1).double().mean(1))
    return torch.cat(correct).cpu().numpy(), torch.cat(losses).cpu().numpy()


def _snapshot(group, x_test, y_test, x_tr, y_tr):
    rows = group.rows()
    test_acc, test_loss = evaluate(group.arch, rows, x_test, y_test)
    own = group.subset[:TRAIN_EVAL_IMAGES]
    train_acc, train_loss = evaluate(group.arch, rows, x_tr[own], y_tr[own])
    return rows.cpu().numpy(), {"test_accuracy": test_acc, "test_loss": test_loss,
                                "train_accuracy": train_acc, "train_loss": train_loss}


# -----------------------------------------------------------------------------
# the build

def build(out_dir, *, num_runs=600, epochs=8, seed=0, device="cpu", batch_size=8, workers=None, progress=True):
    """Train num_runs runs and write them (3 checkpoints each) as a Small CNN Zoo under out_dir.

    batch_size 8 of 1,258 training digits is about the zoo's 512 of 50,000 images (~1% per step).
    workers: groups trained concurrently (default: the usable CPU cores). Returns the summary also
    written to out_dir/build_summary.json: num_runs, final_step (= epochs: pack with this final_step),
    checkpoint steps and quantiles of the final test accuracies; the returned one adds the seconds, which
    the file leaves out so that the same parameters give the same bytes.
    """
    start_time = time.time()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    hp = sample_hparams(num_runs, np.random.default_rng(seed))
    data = [t.to(device) for t in (*train_digits(), *heldout_digits())]
    groups = _groups(hp, len(data[1]), seed, device)
    snap_epochs = sorted({0, epochs // 2, epochs})
    bar = tqdm(total=epochs * sum(len(g.subset) // batch_size for _, g, _ in groups), desc="digits_cnn",
               disable=not progress)
    lock = threading.Lock()

    def train(i):
        _, group, gens = groups[i]
        return _train(group, gens, data, epochs, snap_epochs, batch_size, lambda: _tick(bar, lock))

    # Every group is trained by one thread with single-threaded ops, the groups side by side on the
    # cores. Intra-op threads over these small tensors mostly synchronize (4x slower on 2 busy cores),
    # and this way the results depend only on the seed, not on the machine's thread count.
    order = sorted(range(len(groups)), key=lambda i: -len(groups[i][1].hp) * len(groups[i][1].subset))
    with _intra_op_threads(1), ThreadPoolExecutor(max_workers=workers or _usable_cores()) as pool:
        trained = dict(zip(order, pool.map(train, order)))  # biggest groups first: balanced workers
    bar.close()
    snaps = {e: [(groups[i][0], *trained[i][e]) for i in range(len(groups))] for e in snap_epochs}
    weights, metrics = _assemble(hp, snaps, snap_epochs, epochs, seed)
    final = metrics.loc[metrics["step"] == epochs, "test_accuracy"].to_numpy()
    summary = {"num_runs": num_runs, "epochs": epochs, "final_step": epochs, "checkpoint_steps": snap_epochs,
               "heldout_images": len(data[3]),
               "final_test_accuracy": {q: float(np.quantile(final, float(q)))
                                       for q in ("0", "0.1", "0.25", "0.5", "0.75", "0.9", "1")},
               "nonfinite_runs": int((~np.isfinite(weights[metrics["step"].to_numpy() == epochs])).any(1).sum())}
    small_cnn_zoo.write_zoo(out_dir, small_cnn_zoo.to_tf_layout(weights), metrics,
                            extras={"build_summary.json": summary})
    return {**summary, "seconds": round(time.time() - start_time, 1)}


def _train(group, gens, data, epochs, snap_epochs, batch_size, tick):
    """Train one group for `epochs` epochs; {epoch: (rows, metrics)} at the snapshot epochs."""
    x_tr, y_tr, x_test, y_test = data
    shuffle_gen, dropout_gen = gens
    snaps = {}
    for epoch in range(epochs + 1):
        if epoch in snap_epochs:
            snaps[epoch] = _snapshot(group, x_test, y_test, x_tr, y_tr)
        if epoch == epochs:
            return snaps
        # Keras: reshuffle every epoch, fixed-size batches, the remainder dropped.
        order = group.subset[torch.randperm(len(group.subset), generator=shuffle_gen).to(x_tr.device)]
        for s in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[s:s + batch_size]
            group.step(x_tr[idx], y_tr[idx], dropout_gen)
            tick()


def _usable_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _tick(bar, lock):
    with lock:
        bar.update(1)


@contextlib.contextmanager
def _intra_op_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _groups(hp, n_train, seed, device):
    """Runs batched by (activation, train_fraction): [(run indices, Runs, (shuffle gen, dropout gen))].

    A train_fraction f run trains on the first f of one fixed shuffle of the training digits: the zoo's
    runs all used random_seed 42 for that shuffle, so runs with equal fractions shared their subset.
    Training only on the subset (f of the batches per epoch, as Keras' take()) makes the cost
    proportional to f instead of computing masked-out examples. Each group has its own random streams,
    so groups can train in any order or concurrently.
    """
    shuffled = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    keys = [(act, frac) for act in ACTIVATIONS for frac in TRAIN_FRACTIONS]
    streams = np.random.SeedSequence(seed).spawn(len(keys))
    groups = []
    for (act, frac), stream in zip(keys, streams):
        runs = np.flatnonzero((hp["config.activation"].to_numpy() == act)
                              & (hp["config.train_fraction"].to_numpy() == frac))
        if len(runs):
            init_seed, shuffle_seed, dropout_seed = (int(v) for v in stream.generate_state(3))
            group = Runs(small_cnn.zoo_arch(act), hp.iloc[runs].reset_index(drop=True),
                         shuffled[:int(frac * n_train)], torch.Generator().manual_seed(init_seed), device)
            gens = (torch.Generator().manual_seed(shuffle_seed), torch.Generator(device).manual_seed(dropout_seed))
            groups.append((runs, group, gens))
    return groups


def _assemble(hp, snaps, snap_epochs, epochs, seed):
    """Rows ordered as in the published zoo: run by run, each run's checkpoints by step."""
    num_runs, n_snaps = len(hp), len(snap_epochs)
    weights = np.zeros((num_runs * n_snaps, small_cnn_zoo.NUM_PARAMS), dtype=np.float32)
    cols = {k: np.zeros(num_runs * n_snaps) for k in ("test_accuracy", "test_loss", "train_accuracy", "train_loss")}
    for j, epoch in enumerate(snap_epochs):
        for runs, rows, values in snaps[epoch]:
            at = runs * n_snaps + j
            weights[at] = rows
            for k, v in values.items():
                cols[k][at] = v
    rep = hp.loc[hp.index.repeat(n_snaps)].reset_index(drop=True)
    metrics = pd.DataFrame({
        "config.activation": rep["config.activation"], "config.b_init": "zeros",
        "config.dataset": "sklearn_digits_32x32", "config.dnn_architecture": "cnn",
        "config.dropout": rep["config.dropout"], "config.epochs": epochs,
        "config.epochs_between_checkpoints": max(1, epochs // 2), "config.init_std": rep["config.init_std"],
        "config.l2reg": rep["config.l2reg"], "config.learning_rate": rep["config.learning_rate"],
        "config.num_layers": 3, "config.num_units": 16, "config.optimizer": rep["config.optimizer"],
        "config.random_seed": seed, "config.train_fraction": rep["config.train_fraction"],
        "config.w_init": rep["config.w_init"],
        "modeldir": [f"digits_cnn/run_{i // n_snaps:05d}" for i in range(num_runs * n_snaps)],
        "step": np.tile(snap_epochs, num_runs), **cols})
    return weights, metrics


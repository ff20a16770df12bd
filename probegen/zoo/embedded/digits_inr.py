"""The embedded INR zoo: one DWSNets SIREN per sklearn digit, fitted on CPU in minutes, no download.

Each 8x8 `load_digits` image is upsampled to 28x28 (bilinear, values in [0, 1], ink bright as in MNIST) and
fitted by a SIREN whose output is net(x) + 0.5 on the 28x28 coordinate grid, as DWSNets fitted MNIST.
All models train at once as (N, D) weight rows with one Adam over them; a model freezes once it reaches
the early-stopping PSNR (DWSNets stop at 40 dB). The result is written in the published MNIST layout:

    out_dir/digits-inrs/digits_png_training_<digit>_<index>/checkpoints/model_final.pth
    out_dir/build_summary.json

Recipe (DWSNets, issue #6 and nn/inr.py): MSE, Adam, sine layers initialised U(+-sqrt(6/fan_in)/w0) - the
first layer too, their `is_first` flag is never set - zero sine-layer biases, and PyTorch's default nn.Linear
init for the output layer. Their lr is 5e-4 for up to 1,000 steps, but with that init it is slow: on 40
digits it gave a mean of 31.7 dB after 1,000 steps, with no model at 40 dB. lr 6e-3 gives 31.3 dB over all
1,797 digits after 120 steps (about 100 s on 2 busy CPU cores), so those are the defaults; lr >= 8e-3
diverges on some models.
"""

import contextlib
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from tqdm import tqdm

from probegen.errors import ProbegenError
from probegen.io import atomic_dir, write_json
from probegen.nets import siren
from probegen.zoo.formats.dwsnets_inr import write_checkpoint

ARCH = siren.DWSNETS_ARCH
SIDE = 28
SPLIT = "training"  # the split word of the MNIST INR folders; the split stage decides the real split
STOP_PSNR = 40.0
CPU_CHUNK = 32  # models per batched matmul on CPU: the activations of a chunk stay in cache


def select(labels, num_models, seed):
    """Indices of the models to build: all when num_models is None, else a seeded class-stratified subset.

    Classes are interleaved (first a random member of each class, then a second, ...), so any prefix is
    balanced; the chosen indices are returned sorted.
    """
    if num_models is None:
        return np.arange(len(labels))
    if not 1 <= num_models <= len(labels):
        raise ProbegenError(f"num_models: expected 1..{len(labels)}, got {num_models}")
    perm = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = perm[labels[perm] == c]
        rank[members] = np.arange(len(members))
    order = perm[np.argsort(rank[perm], kind="stable")]
    return np.sort(order[:num_models])


def digit_images(indices):
    """(n, SIDE*SIDE, 1) targets in [0, 1], row-major like siren.grid_coords, and (n,) labels."""
    digits = load_digits()
    images = torch.tensor(digits.images[indices], dtype=torch.float32).unsqueeze(1) / 16.0  # (n, 1, 8, 8)
    images = F.interpolate(images, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return images.reshape(len(indices), SIDE * SIDE, 1), digits.target[indices]


def init_weights(arch, n, generator):
    """(n, D) DWSNets init: sine layers U(+-sqrt(6/fan_in)/w0) with zero bias, output layer nn.Linear's."""
    shapes = siren.param_shapes(arch)
    rows = []
    for i in range(0, len(shapes), 2):
        (_, w_shape), (_, b_shape) = shapes[i], shapes[i + 1]
        fan_in = w_shape[1]
        last = i == len(shapes) - 2
        bound = 1 / math.sqrt(fan_in) if last else math.sqrt(6 / fan_in) / arch["w0"]
        w = (torch.rand(n, *w_shape, generator=generator) * 2 - 1) * bound
        b = (torch.rand(n, *b_shape, generator=generator) * 2 - 1) * bound if last else torch.zeros(n, *b_shape)
        rows += [w.flatten(1), b]
    return torch.cat(rows, 1)


def loss_and_grad(arch, weights, targets, coords):
    """Per-model MSE (C,) and its gradient (C, D), backpropagated by hand through siren.forward's math.

    Cheaper than autograd here: w0 is folded into the matmuls and cos is computed in place of the
    pre-activation, so a chunk needs two (C, K, hidden) buffers per hidden layer.
    """
    layers = siren.unflatten(arch, weights)
    w0, C, K = arch["w0"], weights.shape[0], coords.shape[0]
    h = coords.expand(C, K, coords.shape[1])
    acts, coss = [h], []
    for W, b in layers[:-1]:
        z = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2), beta=w0, alpha=w0)  # (C, K, out) w0 (hW^T + b)
        h = torch.sin(z)
        coss.append(torch.cos(z, out=z))
        acts.append(h)
    W, b = layers[-1]
    r = torch.baddbmm((b + arch["out_bias"]).unsqueeze(1) - targets, h, W.transpose(1, 2))  # (C, K, out) residual
    mse = r.square().mean((1, 2))
    dz = r.mul_(2.0 / r[0].numel())  # d mse / d output
    grads = [None] * (2 * len(layers))
    for i in reversed(range(len(layers))):
        grads[2 * i] = torch.bmm(dz.transpose(1, 2), acts[i]).flatten(1)  # dW (C, out * in)
        grads[2 * i + 1] = dz.sum(1)  # db (C, out)
        if i > 0:  # through W_i and sin(w0 u): d/du = w0 cos(w0 u)
            W_scaled = layers[i][0] * w0  # (C, out, in)
            if W_scaled.shape[1] == 1:  # one output: (C, K, 1) x (C, 1, in) is a broadcast product, not a bmm
                dz = coss[i - 1].mul_(dz).mul_(W_scaled)  # (C, K, in), in the cos buffer (not needed after)
            else:
                dz = torch.bmm(dz, W_scaled).mul_(coss[i - 1])  # (C, K, in)
    return mse, torch.cat(grads, 1)


@contextlib.contextmanager
def chunk_workers():
    """Run each op single-threaded and spread model chunks over Python threads instead.

    The per-chunk ops are small, so OpenMP's fork/join per op costs more than it gains, and on a shared
    machine it collapses (we measured 3-10x slowdowns with 2 threads on 2 busy cores). Chunks are
    independent and each is computed by single-threaded ops, so the result does not depend on the
    number of workers.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def fit(arch, weights, targets, coords, *, steps, lr, chunk, stop_psnr=STOP_PSNR, progress=True):
    """Fit all models in place: weights (N, D), targets (N, K, out). Returns the final PSNR (N,).

    Adam by hand because a frozen model must not move: torch's Adam keeps moving a parameter whose
    gradient is zeroed (momentum), and indexing the active rows also skips their compute.
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m, v = torch.zeros_like(weights), torch.zeros_like(weights)
    active = torch.arange(len(weights), device=weights.device)
    bar = tqdm(range(1, steps + 1), desc="fit digits INRs", unit="step", disable=not progress)
    with chunk_workers() as pool:
        for t in bar:
            def work(s, rows=active):
                rows = rows[s:s + chunk]
                return loss_and_grad(arch, weights[rows], targets[rows], coords)
            results = list(pool.map(work, range(0, len(active), chunk)))
            mse = torch.cat([r[0] for r in results])  # (A,)
            grad = torch.cat([r[1] for r in results])  # (A, D)
            keep = -10 * torch.log10(mse) < stop_psnr  # reached models freeze with the weights just scored
            rows, grad = active[keep], grad[keep]
            m_rows = m[rows].mul_(beta1).add_(grad, alpha=1 - beta1)
            v_rows = v[rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            m[rows], v[rows] = m_rows, v_rows
            weights[rows] -= lr * (m_rows / (1 - beta1 ** t)) / ((v_rows / (1 - beta2 ** t)).sqrt() + eps)
            active = rows
            bar.set_postfix(active=len(active), mean_psnr=f"{-10 * torch.log10(mse).mean():.1f}")
            if len(active) == 0:
                break
    return psnr(arch, weights, targets, coords, chunk)


@torch.no_grad()
def psnr(arch, weights, targets, coords, chunk):
    """(N,) PSNR in dB of each model's image (peak 1), computed with the family's forward."""
    out = []
    for s in range(0, len(weights), chunk):
        pred = siren.forward(arch, weights[s:s + chunk], coords)  # (C, K, out)
        out.append(-10 * torch.log10((pred - targets[s:s + chunk]).square().mean((1, 2))))
    return torch.cat(out)


def checkpoint_path(root, label, index):
    return Path(root) / "digits-inrs" / f"digits_png_{SPLIT}_{label}_{index}" / "checkpoints" / "model_final.pth"


def build(out_dir, *, num_models=None, steps=120, lr=6e-3, seed=0, device="cpu", batch=None, progress=True):
    """Build the zoo into out_dir (atomically) and return its summary (also out_dir/build_summary.json, which
    holds no timing: the same parameters give the same bytes; the seconds are in the returned summary only).

    batch: models per batched matmul (default: 32 on CPU, all at once on a GPU); it changes speed only.
    """
    start = time.time()
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    digits = load_digits()
    indices = select(digits.target, num_models, seed)
    targets, labels = digit_images(indices)
    weights = init_weights(ARCH, len(indices), torch.Generator().manual_seed(seed)).to(device)
    chunk = batch or (CPU_CHUNK if device.type == "cpu" else len(indices))
    coords = siren.grid_coords(SIDE).to(device)
    final = fit(ARCH, weights, targets.to(device), coords, steps=steps, lr=lr, chunk=chunk, progress=progress)
    summary = {"num_models": len(indices), "mean_psnr": round(final.mean().item(), 3),
               "min_psnr": round(final.min().item(), 3), "reached_stop_psnr": int((final >= STOP_PSNR).sum()),
               "steps": steps, "lr": lr, "seed": seed}
    with atomic_dir(out_dir) as tmp:
        for row, label, index in zip(weights.cpu(), labels, indices):
            write_checkpoint(checkpoint_path(tmp, label, index), siren.state_dict(ARCH, row))
        write_json(tmp / "build_summary.json", summary)
    return {**summary, "seconds": round(time.time() - start, 1)}

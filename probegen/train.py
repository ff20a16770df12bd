"""One training loop for every method.

Adam/AdamW, cosine annealing over all steps, validation every `eval_every` steps and at the end, the
best-validation state kept, the test metric measured with that state (= at the best validation step, as
Neural Graphs reports). bf16 autocast on CUDA only. Loss: cross-entropy (classification) or MSE on the raw
label (regression); metric: accuracy or Kendall's tau.
"""

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from probegen.errors import ProbegenError
from probegen.methods.base import zoo_rows
from probegen.metrics import count_params, kendall_tau

RAM_LIMIT_BYTES = 2 * 1024 ** 3  # a split whose weights fit under this is read once into memory


@dataclass
class TrainResult:
    metrics: dict  # metric, val (best), test (at best val), best_step, steps, train_seconds, ...
    curve: pd.DataFrame  # step, train_loss, val_metric, lr
    state_dict: dict  # the best-validation state, on CPU
    test_pred: np.ndarray  # predicted class (classification) or value (regression), test order
    test_target: np.ndarray


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ProbegenError("device: cuda requested but no CUDA device is available; use auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ProbegenError(f"device: expected auto, cpu or cuda, got {name!r}")
    return torch.device(name)


class _Split:
    """One split's rows. When they fit (RAM_LIMIT_BYTES) they are read once and kept on the training
    device, ragged as packed, so a batch is an index into memory: no per-step disk read or host-to-device
    copy. Otherwise each batch is read from the memmap."""

    def __init__(self, zoo, idx, device):
        self.zoo, self.idx, self.device = zoo, np.ascontiguousarray(idx, dtype=np.int64), device
        labels = np.asarray(zoo.labels)[self.idx].astype(np.int64 if zoo.task == "classification" else np.float32)
        self.labels = torch.from_numpy(labels).to(device)
        self.arch_ids = torch.from_numpy(zoo.arch_ids[self.idx]).to(device)
        fits = int(zoo.weights.sizes[self.idx].sum()) * 4 <= RAM_LIMIT_BYTES
        self.weights = zoo.weights.select(self.idx).to(device) if fits else None  # ZooRows

    def __len__(self):
        return len(self.idx)

    def batch(self, pos):
        """pos: positions within the split (B,) -> weights (B, D), arch_ids (B,), labels (B,) on device."""
        on_device = pos.to(self.device)
        if self.weights is not None:
            w = self.weights[on_device]
        else:
            w = zoo_rows(self.zoo, self.idx[pos.numpy()]).to(self.device, non_blocking=True)
        return w, self.arch_ids[on_device], self.labels[on_device]


def train(method, zoo, split, *, epochs, batch_size, lr, optimizer="adam", weight_decay=0.0, grad_clip=None,
          eval_every=500, seed=0, device="auto", progress=True):
    """Train `method` on zoo rows split["train"]; select on split["val"]; report split["test"]."""
    for name in ("train", "val", "test"):
        if len(split.get(name, [])) == 0:
            raise ProbegenError(f"split: '{name}' is empty; every split needs at least one model")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("eval_every", eval_every)):
        if not isinstance(value, int) or value <= 0:
            raise ProbegenError(f"train: {name} must be a positive integer, got {value!r}")
    device = resolve_device(device)
    torch.manual_seed(seed)
    method.prepare(zoo, np.asarray(split["train"]))
    method.to(device)
    data = {name: _Split(zoo, split[name], device) for name in ("train", "val", "test")}
    opt = _optimizer(method, optimizer, lr, weight_decay)
    steps_per_epoch = math.ceil(len(data["train"]) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    regression = zoo.task == "regression"
    order_gen = torch.Generator().manual_seed(seed)

    rows, best = [], None
    running, seen, step = torch.zeros((), device=device), 0, 0
    start = time.time()
    bar = tqdm(total=total, disable=not progress, desc=f"{method.name}", leave=False)
    for _ in range(epochs):
        for pos in torch.randperm(len(data["train"]), generator=order_gen).split(batch_size):
            lr_now = sched.get_last_lr()[0]  # the rate this step uses
            loss = _step(method, opt, data["train"].batch(pos), regression, grad_clip)
            sched.step()
            running, seen, step = running + loss, seen + 1, step + 1  # a tensor: no per-step GPU sync
            bar.update(1)
            if step % eval_every == 0 or step == total:
                val = evaluate(method, data["val"], regression, batch_size)["metric"]
                rows.append({"step": step, "train_loss": running.item() / seen, "val_metric": val, "lr": lr_now})
                running, seen = torch.zeros((), device=device), 0
                # Strictly better keeps the earliest best; an undefined metric (nan: e.g. constant
                # predictions have no Kendall's tau) ranks below every number.
                score = -math.inf if math.isnan(val) else val
                if best is None or score > best["score"]:
                    best = {"score": score, "val": val, "step": step, "state": _cpu_state(method)}
                bar.set_postfix(loss=f"{rows[-1]['train_loss']:.4f}", val=f"{val:.4f}")
    bar.close()
    seconds = time.time() - start

    method.load_state_dict(best["state"])
    test = evaluate(method, data["test"], regression, batch_size)
    metrics = {
        "metric": "kendall_tau" if regression else "accuracy",
        "val": best["val"], "test": test["metric"], "best_step": best["step"], "steps": total,
        "train_seconds": seconds, "trainable_params": count_params(method),
        "flops_per_model": int(method.flops_per_model()), "seed": seed,
        "num_train": len(data["train"]), "num_val": len(data["val"]), "num_test": len(data["test"]),
        "device": str(device),
    }
    return TrainResult(metrics, pd.DataFrame(rows, columns=["step", "train_loss", "val_metric", "lr"]),
                       best["state"], test["pred"], test["target"])


def _step(method, opt, batch, regression, grad_clip):
    """One optimisation step on (weights, arch_ids, labels) -> the detached loss."""
    w, a, y = batch
    method.train()
    with _autocast(w.device):
        out = method(w, a)
    loss = F.mse_loss(out.float(), y) if regression else F.cross_entropy(out.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(method.parameters(), grad_clip)
    opt.step()
    return loss.detach()


@torch.no_grad()
def evaluate(method, data, regression, batch_size):
    """Metric on one split -> {"metric", "pred", "target"}; predictions in the split's order.

    Evaluates in training-sized batches: a probed CNN's activations grow with batch x K, and the
    training batch is known to fit."""
    method.eval()
    preds = []
    for pos in torch.arange(len(data)).split(batch_size):
        w, a, _ = data.batch(pos)
        with _autocast(w.device):
            out = method(w, a).float()
        preds.append(out if regression else out.argmax(-1))
    pred = torch.cat(preds).cpu().numpy()
    target = data.labels.cpu().numpy()
    metric = kendall_tau(pred, target) if regression else float((pred == target).mean())
    return {"metric": metric, "pred": pred, "target": target}


def _optimizer(method, name, lr, weight_decay):
    params = [p for p in method.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ProbegenError(f"optimizer: expected adam or adamw, got {name!r}")


def _autocast(device):
    # bf16 on CUDA only: CPU autocast is slow and changes numerics for no gain here.
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def _cpu_state(module):
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

"""One training loop for every method, for one seed or for several seeds trained together.

    results = train_seeds(methods, zoo, split, seeds=[0, 1, 2], epochs=..., ...)   # one method per seed
    result = train(method, zoo, split, seed=0, epochs=..., ...)                      # the same, one seed

Adam/AdamW, cosine annealing over all steps, validation every `eval_every` steps and at the end, the
best-validation state kept, the test metric measured with that state (= at the best validation step, as
Neural Graphs reports). bf16 autocast on CUDA only. Loss: cross-entropy (classification) or MSE on the raw
label (regression); metric: accuracy or Kendall's tau.

Seeds of one (zoo, method) share everything but their randomness, so they train as one **ensemble**: the
S methods' parameters are stacked (torch.func.stack_module_state) and one vmapped step trains them all, each
seed with its own initialisation, data order and augmentation draws, and its own gradient clipping and best
validation state; Adam's update is elementwise, so each seed gets the update it would get alone (tested:
per-step losses agree to float32 rounding). A method that cannot be vmapped (data-dependent control flow,
e.g. a zoo of several architectures, or randomness inside its forward) trains its seeds one after another
in the same process instead (`stackable`).

A run can checkpoint itself (`Checkpoint`: every N steps or T seconds, atomically, outside the stage's
outputs) and resumes from the last one: parameters, optimizer, scheduler, data order, random generators,
best-validation states and the curve so far, so a resumed run ends with the same numbers as an uninterrupted
one. Timings are returned separately (`seconds`), never mixed into the results, so identical inputs give
identical results.
"""

import contextlib
import math
import time
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from probegen.errors import ProbegenError
from probegen.methods.base import zoo_rows
from probegen.metrics import count_params, kendall_tau
from probegen.optim import CosineAdam

RAM_LIMIT_BYTES = 2 * 1024 ** 3  # a split whose weights fit under this is read once into memory
CURVE_COLUMNS = ["step", "train_loss", "val_metric", "lr"]


@dataclass
class TrainResult:
    metrics: dict  # metric, val (best), test (at best val), best_step, steps, ... (no timings)
    curve: pd.DataFrame  # step, train_loss, val_metric, lr
    state_dict: dict  # the best-validation state, on CPU
    test_pred: np.ndarray  # predicted class (classification) or value (regression), test order
    test_target: np.ndarray
    seconds: float = 0.0  # training wall time (all sessions of a resumed run), kept apart from metrics


@dataclass
class Checkpoint:
    """Where and how often a run saves its resumable state. `key` names everything the run depends on; a
    checkpoint with another key (changed params, code or data) is never resumed."""
    path: object
    key: str
    every_steps: int = 0  # 0: never by step count
    every_seconds: float = 0.0  # 0: never by time
    on_corrupt: object = None  # callable(message): told once when an unreadable checkpoint is ignored
    _last: float = field(default=0.0, repr=False)

    def due(self, step):
        now = time.monotonic()
        if (self.every_steps and step % self.every_steps == 0) or \
                (self.every_seconds and now - self._last >= self.every_seconds):
            self._last = now
            return True
        return False


def resolve_device(name):
    if isinstance(name, torch.device):
        return name
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
        """pos: positions within the split, any shape (e.g. (S, B)) -> weights (*pos.shape, D), arch_ids,
        labels (*pos.shape) on the device."""
        flat = pos.reshape(-1)
        on_device = flat.to(self.device)
        if self.weights is not None:
            # positions within the split: valid by construction, so ZooRows' index checks (a host sync each)
            # would only cost time every step
            w = self.weights.take(on_device.long())
        else:
            w = zoo_rows(self.zoo, self.idx[flat.numpy()]).to(self.device, non_blocking=True)
        return (w.view(*pos.shape, -1), self.arch_ids[on_device].view(pos.shape),
                self.labels[on_device].view(pos.shape))


class _Members:
    """The S methods of a run (one per seed) as one callable: out = members(w (S, B, D), a (S, B)) -> (S, B, ...).

    S = 1 calls the module itself; S > 1 stacks the parameters and buffers and vmaps one functional call."""

    def __init__(self, methods):
        self.methods, self.base, self.S = methods, methods[0], len(methods)
        self._mode = None  # the mode set_mode last set (the first call always sets it)
        if self.S == 1:
            self.params = {k: p for k, p in self.base.named_parameters()}
        else:
            params, self.buffers = stack_module_state(methods)
            self.params = {k: p.detach().requires_grad_(p.requires_grad) for k, p in params.items()}
            # randomness="error": a stacked method must not draw random numbers inside its forward
            self._call = vmap(lambda p, b, w, a: functional_call(self.base, (p, b), (w, a)), randomness="error")

    def __call__(self, w, a):
        if self.S == 1:
            return self.base(w[0], a[0]).unsqueeze(0)
        return self._call(self.params, self.buffers, w, a)

    def trainable(self):
        return [p for p in self.params.values() if p.requires_grad]

    def set_mode(self, training):
        # Module.train walks every submodule: only when the mode changes, not on every step.
        if self._mode != training or self.base.training != training:
            self.base.train(training)
            self._mode = training

    def state(self, s):
        """Member s's state dict, copied to the CPU."""
        if self.S == 1:
            return {k: v.detach().to("cpu", copy=True) for k, v in self.base.state_dict().items()}
        tensors = {**self.params, **self.buffers}
        return {k: tensors[k][s].detach().to("cpu", copy=True) for k in self.base.state_dict()}

    def load(self, s, state):
        if self.S == 1:
            self.base.load_state_dict(state)
            return
        with torch.no_grad():
            for k, v in state.items():
                (self.params if k in self.params else self.buffers)[k][s].copy_(v)

    def finish(self, bests):
        """Load each seed's best state into its own method (the one the caller passed in)."""
        for method, best in zip(self.methods, bests):
            method.load_state_dict(best["state"])


def stackable(method, zoo):
    """Can the seeds of this method train as one vmapped ensemble on this zoo?"""
    return getattr(method, "stackable", True) and len(zoo.archs) == 1


def train(method, zoo, split, *, seed=0, checkpoint=None, on_eval=None, **schedule):
    """Train one method with one seed; see train_seeds for the arguments. Returns a TrainResult."""
    return train_seeds([method], zoo, split, seeds=[seed], checkpoint=checkpoint, on_eval=on_eval, **schedule)[0]


def train_seeds(methods, zoo, split, *, seeds, epochs, batch_size, lr, optimizer="adam", weight_decay=0.0,
                grad_clip=None, eval_every=500, device="auto", progress=True, checkpoint=None, on_eval=None,
                stack=None):
    """Train methods[s] (freshly built with seeds[s]) on zoo rows split["train"]; select on split["val"];
    report split["test"]. on_eval(seed, row) is called after every validation (row: a curve row).
    stack: None = as one ensemble when every method allows it (`stackable`), False = one seed at a time."""
    _check_args(split, seeds, methods, epochs, batch_size, eval_every)
    device = resolve_device(device)
    stack = all(stackable(m, zoo) for m in methods) if stack is None else stack
    data = {name: _Split(zoo, split[name], device) for name in ("train", "val", "test")}
    groups = [list(range(len(seeds)))] if stack or len(seeds) == 1 else [[s] for s in range(len(seeds))]
    results, cks = [], [checkpoint if len(groups) == 1 else _member_checkpoint(checkpoint, g[0]) for g in groups]
    for group, ck in zip(groups, cks):
        # one seed after another: a finished seed keeps its final checkpoint until every seed is done, so a
        # kill during a later seed does not train it again
        with deterministic_kernels():
            results += _fit([methods[s] for s in group], [seeds[s] for s in group], zoo, data, device,
                            epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                            weight_decay=weight_decay, grad_clip=grad_clip, eval_every=eval_every,
                            progress=progress, checkpoint=ck, on_eval=on_eval, keep_final=len(groups) > 1)
    for ck in cks:
        if ck is not None:
            Path(ck.path).unlink(missing_ok=True)  # the run is complete: its outputs replace the checkpoints
    return results


def _check_args(split, seeds, methods, epochs, batch_size, eval_every):
    for name in ("train", "val", "test"):
        if len(split.get(name, [])) == 0:
            raise ProbegenError(f"split: '{name}' is empty; every split needs at least one model")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ProbegenError(f"train: {name} must be a positive integer, got {value!r}")
    if len(seeds) != len(methods) or len(set(seeds)) != len(seeds):
        raise ProbegenError(f"train: one method per seed and distinct seeds, got seeds {list(seeds)}")


def _member_checkpoint(checkpoint, index):
    if checkpoint is None:
        return None
    from pathlib import Path
    path = Path(checkpoint.path)
    return Checkpoint(path.with_name(f"{path.stem}.{index}{path.suffix}"), checkpoint.key, checkpoint.every_steps,
                      checkpoint.every_seconds, checkpoint.on_corrupt)


def _fit(methods, seeds, zoo, data, device, *, epochs, batch_size, lr, optimizer, weight_decay, grad_clip,
         eval_every, progress, checkpoint, on_eval, keep_final=False):
    """The loop itself, for S = len(methods) seeds at once. keep_final: save the finished state as the
    checkpoint (resuming it trains nothing) instead of leaving the checkpoint to the caller."""
    S, regression = len(methods), zoo.task == "regression"
    for method, seed in zip(methods, seeds):
        torch.manual_seed(seed)
        method.prepare(zoo, data["train"].idx)
        method.to(device)
    members = _Members(methods)
    steps_per_epoch = math.ceil(len(data["train"]) / batch_size)
    total = epochs * steps_per_epoch
    opt = _optimizer(members.trainable(), optimizer, lr, weight_decay, total)
    state = _State.fresh(seeds, device)
    if checkpoint is not None:
        state = _resume(checkpoint, state, members, opt, S) or state
    torch.manual_seed(seeds[0])  # the global generator: only methods' own randomness (e.g. dropout) uses it
    if state.rng is not None:
        torch.set_rng_state(state.rng)
    for s, rows in enumerate(state.rows):  # a resumed run's curve so far, for the caller's logger
        for row in rows:
            if on_eval is not None:
                on_eval(seeds[s], row)

    start = time.monotonic()
    if checkpoint is not None:
        checkpoint._last = start
    bar = tqdm(total=total, initial=state.step, disable=not progress, desc=methods[0].name, leave=False)
    while state.step < total:
        if state.perm is None:  # a new epoch: every seed draws its own order
            state.perm = torch.stack([torch.randperm(len(data["train"]), generator=g) for g in state.order])
            state.at = 0
        pos = state.perm[:, state.at:state.at + batch_size]  # (S, B)
        lr_now = opt.lr  # the rate this step uses
        loss = _step(members, methods[0], opt, data["train"].batch(pos), regression, grad_clip, state.aug)
        state.running, state.seen, state.step = state.running + loss, state.seen + 1, state.step + 1
        state.at += batch_size
        if state.at >= len(data["train"]):
            state.perm = None
        bar.update(1)
        if state.step % eval_every == 0 or state.step == total:
            _validate(members, methods, seeds, data["val"], regression, batch_size, state, lr_now, on_eval)
            bar.set_postfix(loss=f"{state.rows[0][-1]['train_loss']:.4f}", val=f"{state.rows[0][-1]['val_metric']:.4f}")
        if checkpoint is not None and state.step < total and checkpoint.due(state.step):
            state.seconds += time.monotonic() - start
            start = time.monotonic()
            _save(checkpoint, state, members, opt)
    bar.close()
    state.seconds += time.monotonic() - start
    members.finish(state.best)
    schedule = {"epochs": epochs, "batch_size": batch_size, "steps": total}
    results = [_result(m, data, regression, schedule, state, s, device) for s, m in enumerate(methods)]
    if checkpoint is not None and keep_final and state.step == total:
        _save(checkpoint, state, members, opt)
    return results


@dataclass
class _State:
    """Everything of a run that changes while it trains, other than parameters and optimizer (see _save)."""
    seeds: list
    step: int
    order: list  # one data-order generator per seed
    aug: list  # one augmentation generator per seed
    running: torch.Tensor  # (S,) summed losses since the last validation: a tensor, so no per-step GPU sync
    seen: int
    rows: list  # per seed: curve rows so far
    best: list  # per seed: {"score", "val", "step", "state"} or None
    perm: torch.Tensor = None  # (S, N) this epoch's order, None between epochs
    at: int = 0  # position within the epoch
    rng: torch.Tensor = None  # the global generator's state (resumed runs only)
    seconds: float = 0.0

    @classmethod
    def fresh(cls, seeds, device):
        S = len(seeds)
        return cls(list(seeds), 0, [torch.Generator().manual_seed(s) for s in seeds],
                   [torch.Generator().manual_seed(s + 1_000_003) for s in seeds],
                   torch.zeros(S, device=device), 0, [[] for _ in seeds], [None] * S)


def _step(members, method, opt, batch, regression, grad_clip, aug_gens):
    """One optimisation step of every seed on its own batch (weights (S, B, D), arch_ids, labels) -> the
    detached per-seed losses (S,)."""
    w, a, y = batch
    members.set_mode(True)
    if method.cfg.get("augment"):  # train-time weight-space augmentation, drawn per seed
        w = torch.stack([method.augment(w[s], a[s], aug_gens[s]) for s in range(len(aug_gens))])
    with _autocast(w.device):
        out = members(w, a).float()  # (S, B, C) | (S, B)
    if regression:
        losses = ((out - y) ** 2).mean(1)
    else:
        losses = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
    opt.zero_grad()
    losses.sum().backward()  # each seed's parameters get only its own loss's gradient
    if grad_clip is not None:
        _clip(members, grad_clip)
    opt.step()
    return losses.detach()


def _clip(members, max_norm):
    """clip_grad_norm_ for each seed on its own parameters (torch's formula: coef = max / (norm + 1e-6), <= 1)."""
    grads = [p.grad for p in members.trainable() if p.grad is not None]
    if members.S == 1:
        torch.nn.utils.clip_grad_norm_(members.trainable(), max_norm)
        return
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)  # (S,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))


def _validate(members, methods, seeds, val, regression, batch_size, state, lr_now, on_eval):
    losses = state.running.cpu() / state.seen
    bad = [seeds[s] for s in range(len(seeds)) if not math.isfinite(float(losses[s]))]
    if bad:
        name = methods[0].name
        raise ProbegenError(f"training diverged: non-finite loss before step {state.step} (seed {bad[0]}); "
                            f"lower method.{name}.lr or check the zoo for extreme weights")
    metrics = _evaluate_members(members, val, regression, batch_size)
    for s, metric in enumerate(metrics):
        row = {"step": state.step, "train_loss": float(losses[s]), "val_metric": metric, "lr": lr_now}
        state.rows[s].append(row)
        # Strictly better keeps the earliest best; an undefined metric (nan: e.g. constant predictions
        # have no Kendall's tau) ranks below every number.
        score = -math.inf if math.isnan(metric) else metric
        if state.best[s] is None or score > state.best[s]["score"]:
            state.best[s] = {"score": score, "val": metric, "step": state.step, "state": members.state(s)}
        if on_eval is not None:
            on_eval(seeds[s], row)
    state.running, state.seen = torch.zeros_like(state.running), 0


@torch.no_grad()
def _predict(members, data, regression, batch_size):
    """(S, N) predictions of every seed on one split, in training-sized batches (a probed CNN's activations
    grow with batch x K, and the training batch is known to fit)."""
    members.set_mode(False)
    preds = []
    for pos in torch.arange(len(data)).split(batch_size):
        w, a, _ = data.batch(pos)
        S = members.S
        with _autocast(w.device):
            out = members(w.expand(S, *w.shape), a.expand(S, *a.shape)).float()
        preds.append(out if regression else out.argmax(-1))
    return torch.cat(preds, 1).cpu().numpy()


def _metric(pred, target, regression):
    return kendall_tau(pred, target) if regression else float((pred == target).mean())


def _evaluate_members(members, data, regression, batch_size):
    target = data.labels.cpu().numpy()
    return [_metric(p, target, regression) for p in _predict(members, data, regression, batch_size)]


def evaluate(method, data, regression, batch_size):
    """Metric of one method on one split -> {"metric", "pred", "target"}; predictions in the split's order."""
    pred = _predict(_Members([method]), data, regression, batch_size)[0]
    target = data.labels.cpu().numpy()
    return {"metric": _metric(pred, target, regression), "pred": pred, "target": target}


def _result(method, data, regression, schedule, state, s, device):
    best = state.best[s]
    test = evaluate(method, data["test"], regression, schedule["batch_size"])
    metrics = {
        "metric": "kendall_tau" if regression else "accuracy",
        "val": best["val"], "test": test["metric"], "best_step": best["step"], **schedule,
        "trainable_params": count_params(method), "flops_per_model": int(method.flops_per_model()),
        "seed": state.seeds[s],
        "num_train": len(data["train"]), "num_val": len(data["val"]), "num_test": len(data["test"]),
        "device": str(device),
    }
    return TrainResult(metrics, pd.DataFrame(state.rows[s], columns=CURVE_COLUMNS), best["state"],
                       test["pred"], test["target"], state.seconds)


# ------------------------------------------------------------------------------------------- checkpoints


def _save(checkpoint, state, members, opt):
    """Write the resumable state atomically (a killed write leaves the previous checkpoint)."""
    from probegen.io import atomic_path

    blob = {"key": checkpoint.key, "step": state.step, "at": state.at, "perm": state.perm, "seen": state.seen,
            "running": state.running.cpu(), "rows": state.rows, "best": state.best, "seconds": state.seconds,
            "order": [g.get_state() for g in state.order], "aug": [g.get_state() for g in state.aug],
            "rng": torch.get_rng_state(), "members": [members.state(s) for s in range(members.S)],
            "opt": opt.state_dict()}
    with atomic_path(checkpoint.path) as tmp:
        torch.save(blob, tmp)


def _resume(checkpoint, fresh, members, opt, S):
    """The saved state if a checkpoint of this exact run exists and reads cleanly, else None."""
    from pathlib import Path

    path = Path(checkpoint.path)
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
        if blob.get("key") != checkpoint.key:
            return None  # another run's (stale params, code or data): never resumed
        for s in range(S):
            members.load(s, blob["members"][s])
        opt.load_state_dict(blob["opt"])
        for g, saved in zip(fresh.order + fresh.aug, blob["order"] + blob["aug"]):
            g.set_state(saved)
    except Exception as err:  # truncated or foreign file: say so once, start from scratch
        if checkpoint.on_corrupt:
            checkpoint.on_corrupt(f"{path}: unreadable checkpoint ({type(err).__name__}), starting over")
        return None
    device = fresh.running.device
    return _State(fresh.seeds, blob["step"], fresh.order, fresh.aug, blob["running"].to(device), blob["seen"], blob["rows"],
                  blob["best"], blob["perm"], blob["at"], blob["rng"], blob["seconds"])


# -------------------------------------------------------------------------------------------------- misc


def _optimizer(params, name, lr, weight_decay, total_steps):
    # torch's fused Adam kernel: one kernel over all parameters instead of a few per tensor (7x faster per
    # step on this CPU for a 570k-parameter MLP); the update is the same elementwise formula.
    if name not in ("adam", "adamw"):
        raise ProbegenError(f"optimizer: expected adam or adamw, got {name!r}")
    return CosineAdam(params, lr=lr, weight_decay=weight_decay, decoupled=name == "adamw", total_steps=total_steps)


@contextlib.contextmanager
def deterministic_kernels():
    """torch's deterministic kernels for the span of a run, then the caller's setting again.

    Why: on CPU the backward of indexing with repeated indices (x[idx]: the graph networks gather node
    features per edge) accumulates with atomic adds from every thread, so one run on 2 threads gave weights
    that differed in the last bits from the same run repeated. The deterministic path sorts the indices
    first (and measured faster here: 7.4 vs 10.0 ms for 60,000 rows of 32). warn_only: a kernel with no
    deterministic version (some CUDA ones) warns instead of stopping the run. Uninitialised memory is not
    filled (the mode's debugging aid, a cost on every allocation)."""
    import torch.utils.deterministic as det

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              det.fill_uninitialized_memory)
    _set_deterministic(True, warn_only=True)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        _set_deterministic(*before[:2])
        det.fill_uninitialized_memory = before[2]


def _set_deterministic(mode, warn_only):
    # torch.use_deterministic_algorithms also sets torch._inductor's config, whose import pulls in
    # torch._dynamo (2-3 s of a training process). Nothing here is compiled, so only the kernels' flag is
    # set; the public call where a torch build lacks the setter.
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


def _autocast(device):
    # bf16 on CUDA only: CPU autocast is slow and changes numerics for no gain here.
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)

import numpy as np
import pandas as pd
import pytest
import torch

from fake_zoo import make_zoo, register_tiny, split_of
from probegen.errors import ProbegenError
from probegen.methods import build_method
from probegen.metrics import kendall_tau
from probegen.training import _Members, _Split, evaluate, resolve_device, stackable, train, train_seeds

ARCHS = [{"in": 2, "hidden": 6, "out": 1}]
SMALL = {"hidden": 32, "layers": 3}
FAST = dict(batch_size=16, lr=3e-3, optimizer="adam", weight_decay=0.0, grad_clip=None, device="cpu",
            progress=False)


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    register_tiny(monkeypatch)


def _run(name, zoo, split, seed=0, **kw):
    method = build_method(name, zoo, SMALL, num_probes=8, seed=seed)
    return method, train(method, zoo, split, seed=seed, **{**FAST, **kw})


def test_learns_a_separable_zoo():
    zoo = make_zoo("tiny_mlp", ARCHS, 200, num_classes=3, signal=3.0)
    _, res = _run("probegen", zoo, split_of(200), epochs=6, eval_every=10, lr=1e-2)
    m = res.metrics
    assert m["metric"] == "accuracy" and m["val"] > 0.7 and m["test"] > 0.6  # chance is 1/3
    assert m["num_train"] == 120 and m["num_val"] == 40 and m["num_test"] == 40
    assert m["steps"] == 6 * 8 and m["trainable_params"] > 0 and m["flops_per_model"] > 0
    assert len(res.test_pred) == 40 and np.array_equal(res.test_target, zoo.labels[split_of(200)["test"]])


def test_regression_with_weight_method_and_clipping():
    zoo = make_zoo("tiny_mlp", ARCHS, 200, task="regression")
    _, res = _run("statnn", zoo, split_of(200), epochs=6, eval_every=20, optimizer="adamw",
                  weight_decay=5e-4, grad_clip=10.0)
    assert res.metrics["metric"] == "kendall_tau" and res.metrics["test"] > 0.5
    assert res.metrics["test"] == pytest.approx(kendall_tau(res.test_pred, res.test_target))


def test_curve_schedule_and_best_step():
    zoo = make_zoo("tiny_mlp", ARCHS, 100, num_classes=3)
    _, res = _run("vanilla", zoo, split_of(100), epochs=3, eval_every=4)
    curve = res.curve
    assert list(curve.columns) == ["step", "train_loss", "val_metric", "lr"]
    steps = res.metrics["steps"]  # 60 train models / 16 = 4 steps per epoch
    assert curve["step"].tolist() == sorted(set(range(4, steps + 1, 4)) | {steps})
    assert curve["lr"].is_monotonic_decreasing and curve["lr"].iloc[0] < FAST["lr"]  # cosine annealing
    best = curve["val_metric"].idxmax()  # first maximum
    assert res.metrics["best_step"] == curve["step"][best]
    assert res.metrics["val"] == curve["val_metric"][best]


def test_test_metric_is_taken_at_the_best_validation_step():
    # Validation labels are negated: the better the model fits, the worse validation gets, so the best
    # validation step comes early, and the test metric there differs from the one at the end.
    zoo = make_zoo("tiny_mlp", ARCHS, 240, task="regression", seed=1)
    split = split_of(240, seed=1)
    zoo.labels[split["val"]] *= -1
    method, res = _run("mlp", zoo, split, epochs=8, eval_every=3)
    assert res.metrics["best_step"] < res.metrics["steps"]
    # the returned state reproduces both numbers
    method.load_state_dict(res.state_dict)
    assert evaluate(method, _Split(zoo, split["val"], torch.device("cpu")), True, 16)["metric"] == res.metrics["val"]
    assert evaluate(method, _Split(zoo, split["test"], torch.device("cpu")), True, 16)["metric"] == res.metrics["test"]
    # ... and the final model (one evaluation, at the end) scores differently on test
    _, last = _run("mlp", zoo, split, epochs=8, eval_every=10_000)
    assert last.metrics["best_step"] == last.metrics["steps"]
    assert last.metrics["test"] > res.metrics["test"]


def test_deterministic_for_a_seed():
    zoo = make_zoo("tiny_mlp", ARCHS, 80, num_classes=3)
    split = split_of(80)
    _, a = _run("probegen", zoo, split, epochs=2, eval_every=3, seed=7)
    _, b = _run("probegen", zoo, split, epochs=2, eval_every=3, seed=7)
    _, c = _run("probegen", zoo, split, epochs=2, eval_every=3, seed=8)
    pd.testing.assert_frame_equal(a.curve, b.curve)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert {k: v for k, v in a.metrics.items() if k != "train_seconds"} == \
        {k: v for k, v in b.metrics.items() if k != "train_seconds"}
    assert not a.curve["train_loss"].equals(c.curve["train_loss"])


def test_reads_rows_from_the_memmap_when_a_split_is_too_big(monkeypatch):
    import probegen.training as tr
    zoo = make_zoo("tiny_mlp", ARCHS, 60, num_classes=3)
    split = split_of(60)
    _, in_ram = _run("mlp", zoo, split, epochs=2, eval_every=2)
    monkeypatch.setattr(tr, "RAM_LIMIT_BYTES", 0)
    assert _Split(zoo, split["train"], torch.device("cpu")).weights is None
    _, streamed = _run("mlp", zoo, split, epochs=2, eval_every=2)
    pd.testing.assert_frame_equal(in_ram.curve, streamed.curve)


def test_bad_arguments():
    zoo = make_zoo("tiny_mlp", ARCHS, 30)
    split = split_of(30)
    with pytest.raises(ProbegenError, match="optimizer"):
        _run("mlp", zoo, split, epochs=1, eval_every=1, optimizer="sgd")
    with pytest.raises(ProbegenError, match="'val' is empty"):
        _run("mlp", zoo, {**split, "val": []}, epochs=1, eval_every=1)
    with pytest.raises(ProbegenError, match="epochs"):
        _run("mlp", zoo, split, epochs=0, eval_every=1)
    with pytest.raises(ProbegenError, match="device"):
        resolve_device("tpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_split_held_in_memory_gives_rows_as_wide_as_the_zoo():
    # A mixed zoo whose largest model is not in this split: batches must still be (B, zoo D), what
    # mlp's input layer and standardisation were built for.
    archs = [{"in": 2, "hidden": 3, "out": 1}, {"in": 2, "hidden": 9, "out": 1}]
    zoo = make_zoo("tiny_mlp", archs, 20, arch_ids=[0] * 19 + [1])
    data = _Split(zoo, np.arange(19)[::-1], torch.device("cpu"))
    w, a, _ = data.batch(torch.tensor([0, 5]))
    assert data.weights is not None and w.shape == (2, zoo.weights.shape[1])
    assert torch.equal(w, zoo.weights[[18, 13]]) and a.tolist() == [0, 0]


# ------------------------------------------------------------------------------- seeds as one ensemble


@pytest.mark.parametrize("name,kw", [("probegen", {}), ("vanilla", {}), ("synthetic", {}),
                                     ("mlp", {"optimizer": "adamw", "weight_decay": 5e-4, "grad_clip": 0.05}),
                                     ("statnn", {"optimizer": "adamw", "grad_clip": 1.0})])
def test_seeds_trained_as_one_ensemble_match_each_seed_trained_alone(name, kw):
    zoo = make_zoo("tiny_mlp", ARCHS, 120, num_classes=3)
    split = split_of(120)
    sched = {**FAST, "epochs": 23, "eval_every": 1, **kw}  # 72 train models / 16: 5 steps an epoch, 115 steps
    seeds = [0, 3, 5]
    methods = [build_method(name, zoo, SMALL, num_probes=8, seed=s) for s in seeds]
    together = train_seeds(methods, zoo, split, seeds=seeds, **sched)
    assert all(stackable(m, zoo) for m in methods)
    for s, res in zip(seeds, together):
        alone = train(build_method(name, zoo, SMALL, num_probes=8, seed=s), zoo, split, seed=s, **sched)
        # per-step losses (eval_every=1: each curve row is one step) agree to float32 rounding
        np.testing.assert_allclose(res.curve["train_loss"][:100], alone.curve["train_loss"][:100], rtol=1e-4)
        assert res.metrics["seed"] == s and res.metrics["best_step"] > 0
        for k in alone.state_dict:
            torch.testing.assert_close(res.state_dict[k], alone.state_dict[k], rtol=1e-3, atol=1e-4)
    assert not together[0].curve["train_loss"].equals(together[1].curve["train_loss"])  # seeds differ


def test_a_zoo_of_several_architectures_trains_its_seeds_one_after_another():
    archs = [{"in": 2, "hidden": 3, "out": 1}, {"in": 2, "hidden": 5, "out": 1}]
    zoo = make_zoo("tiny_mlp", archs, 60, num_classes=3)
    methods = [build_method("mlp", zoo, SMALL, num_probes=8, seed=s) for s in (0, 1)]
    assert not stackable(methods[0], zoo)
    together = train_seeds(methods, zoo, split_of(60), seeds=[0, 1], **{**FAST, "epochs": 2, "eval_every": 2})
    alone = train(build_method("mlp", zoo, SMALL, num_probes=8, seed=1), zoo, split_of(60), seed=1,
                  **{**FAST, "epochs": 2, "eval_every": 2})
    pd.testing.assert_frame_equal(together[1].curve, alone.curve)


def test_repeated_seeds_are_refused():
    zoo = make_zoo("tiny_mlp", ARCHS, 30)
    methods = [build_method("mlp", zoo, SMALL, num_probes=8, seed=0) for _ in range(2)]
    with pytest.raises(ProbegenError, match="distinct seeds"):
        train_seeds(methods, zoo, split_of(30), seeds=[0, 0], **{**FAST, "epochs": 1, "eval_every": 1})


def test_a_diverging_run_stops_with_one_line():
    zoo = make_zoo("tiny_mlp", ARCHS, 60, task="regression")
    with pytest.raises(ProbegenError, match=r"non-finite loss .*seed 0.*method.mlp.lr"):
        _run("mlp", zoo, split_of(60), epochs=3, eval_every=2, lr=1e30)


def test_a_training_run_imports_neither_torch_dynamo_nor_scipy_stats():
    """2-3 s and 2 s of every training stage's start-up, for nothing training needs: the optimizer
    (probegen.optim), the FLOP count (probegen.flops) and Kendall's tau (probegen.metrics) do without them."""
    from pathlib import Path
    import subprocess
    import sys

    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from fake_zoo import make_zoo, split_of
from probegen.methods import build_method
from probegen.nets.small_cnn import zoo_arch
from probegen.training import train
zoo = make_zoo("small_cnn", [zoo_arch("relu")], 40, task="regression")
for name in ("probegen", "statnn"):
    method = build_method(name, zoo, {{"hidden": 8, "layers": 2}}, num_probes=4, seed=0)
    res = train(method, zoo, split_of(40), seed=0, epochs=2, batch_size=8, eval_every=2, lr=1e-3,
                optimizer="adamw", weight_decay=0.0, grad_clip=1.0, device="cpu", progress=False)
    assert res.metrics["metric"] == "kendall_tau" and res.metrics["flops_per_model"] > 0
print(sorted(m for m in ("torch._dynamo", "scipy.stats") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_deterministic_kernels_make_gather_backwards_repeat_exactly_and_restore_the_setting():
    """Without them, the backward of x[idx] (the graph networks' per-edge gathers) adds with atomics from
    every thread, and a rerun differs in the last bits; the graph baselines' weights did, run to run."""
    from probegen.training import deterministic_kernels

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the race needs two threads (xdist workers run with one)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 32, requires_grad=True)
    idx, g = torch.randint(0, 2000, (60_000,), generator=gen), torch.randn(60_000, 32, generator=gen)
    grads = []
    try:
        with deterministic_kernels():
            assert torch.are_deterministic_algorithms_enabled()
            for _ in range(5):
                x.grad = None
                (x[idx] * g).sum().backward()
                grads.append(x.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], other) for other in grads[1:])
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back
    torch.testing.assert_close(grads[0], torch.zeros(2000, 32).index_add_(0, idx, g), rtol=1e-5, atol=1e-4)


def test_set_mode_walks_the_modules_when_the_mode_changes_also_from_outside():
    # set_mode skips Module.train while the mode is unchanged; a mode changed behind its back (method.eval()
    # by a caller) must still be corrected, or training would go on without dropout.
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    members = _Members([net])
    members.set_mode(False)
    assert not net.training and not net[1].training
    net.train()  # from outside
    members.set_mode(False)
    assert not net.training and not net[1].training
    members.set_mode(True)
    assert net.training and net[1].training


def test_a_split_batches_the_zoos_rows_at_its_positions():
    zoo = make_zoo("tiny_mlp", ARCHS, 40)
    split = _Split(zoo, np.arange(5, 30), torch.device("cpu"))
    assert split.weights.matrix is not None  # one architecture: rows come from the (N, D) view
    pos = torch.tensor([[0, 3, 24], [7, 7, 1]])  # (S, B)
    w, a, y = split.batch(pos)
    assert w.shape == (2, 3, zoo.weights.shape[1])
    assert torch.equal(w, zoo.weights[torch.tensor([5, 8, 29, 12, 12, 6])].view(2, 3, -1))
    assert torch.equal(y, torch.as_tensor(np.asarray(zoo.labels)[[5, 8, 29, 12, 12, 6]]).view(2, 3))

"""CosineAdam against torch.optim.Adam / AdamW (fused) + CosineAnnealingLR, the pair it replaces: the same
parameters, moments and rates, bit for bit, through a save and reload in the middle."""

import subprocess
import sys

import pytest
import torch

from probegen.optim import CosineAdam

STEPS = 40


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    # the last one never gets a gradient: neither optimizer may touch it
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in [(7, 5), (5,), (3, 4, 2), (4,)]]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params[:-1]:
        p.grad = torch.randn(p.shape, generator=g) * (10.0 ** (step % 5 - 2))  # scales from 1e-2 to 1e2


@pytest.mark.parametrize("name,weight_decay", [("adam", 0.0), ("adam", 0.01), ("adamw", 0.05)])
def test_matches_torch_fused_adam_and_cosine_annealing_bit_for_bit(name, weight_decay):
    ref_params, params = _params(0), _params(0)
    torch_cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    ref = torch_cls(ref_params, lr=3e-3, weight_decay=weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=STEPS)
    opt = CosineAdam(params, lr=3e-3, weight_decay=weight_decay, decoupled=name == "adamw", total_steps=STEPS)
    for step in range(STEPS + 3):  # three past the end: the cosine's climbing half, as torch's
        assert opt.lr == sched.get_last_lr()[0], step
        _grads(ref_params, step), _grads(params, step)
        ref.step(), sched.step(), opt.step()
        for a, b in zip(ref_params, params):
            assert torch.equal(a, b), step
    assert opt.lr != 0.0 and sched.get_last_lr()[0] == opt.lr
    assert torch.equal(params[-1], _params(0)[-1])  # no gradient, never moved
    moments = ref.state[ref_params[0]]
    assert torch.equal(opt.state[0]["exp_avg"], moments["exp_avg"])
    assert torch.equal(opt.state[0]["exp_avg_sq"], moments["exp_avg_sq"])
    assert opt.state[0]["step"].item() == moments["step"].item() == STEPS + 3


def test_a_reloaded_state_continues_as_if_never_stopped(tmp_path):
    straight, resumed = _params(1), _params(1)
    a = CosineAdam(straight, lr=1e-2, weight_decay=0.0, decoupled=False, total_steps=STEPS)
    b = CosineAdam(resumed, lr=1e-2, weight_decay=0.0, decoupled=False, total_steps=STEPS)
    for step in range(STEPS):
        if step == 17:  # a killed run: a new optimizer over the same parameters, from the saved state
            torch.save(b.state_dict(), tmp_path / "opt.pt")
            b = CosineAdam(resumed, lr=1e-2, weight_decay=0.0, decoupled=False, total_steps=STEPS)
            b.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
        _grads(straight, step), _grads(resumed, step)
        a.step(), b.step()
    assert a.lr == b.lr == 0.0  # the last step's rate: cos(pi) = -1 exactly
    for x, y in zip(straight, resumed):
        assert torch.equal(x, y)


def test_a_training_process_does_not_import_torch_dynamo():
    """The reason this module exists: torch.optim.Optimizer imports torch._dynamo (2-3 s a process)."""
    code = ("import sys, torch; from probegen.optim import CosineAdam; p = torch.nn.Parameter(torch.ones(3)); "
            "o = CosineAdam([p], lr=0.1, weight_decay=0.0, decoupled=False, total_steps=2); p.grad = p.detach(); "
            "o.step(); o.zero_grad(); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

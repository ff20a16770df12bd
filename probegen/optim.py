"""Adam / AdamW with cosine annealing over all steps: the training loop's optimizer, without torch.optim.

    opt = CosineAdam(params, lr=3e-4, weight_decay=0.0, decoupled=False, total_steps=T)
    loss.backward(); opt.step()      # one update at opt.lr, then the rate of the next step
    opt.zero_grad()

Why not torch.optim.Adam + CosineAnnealingLR: building a torch.optim.Optimizer imports torch._dynamo (its
methods are wrapped in torch._disable_dynamo), 2-3 s of every training process on this CPU. The update here
is torch's own fused kernel through its functional API (torch.optim.adam.adam, fused=True), and the rate
follows CosineAnnealingLR's recursive formula, so every step matches torch.optim.Adam(fused=True) +
CosineAnnealingLR bit for bit (tests/test_optim.py).
"""

import math

import torch
from torch.optim.adam import adam as fused_adam  # the functional API: no Optimizer, no torch._dynamo

BETAS, EPS = (0.9, 0.999), 1e-8  # torch's defaults


class CosineAdam:
    """Adam (decoupled=False, L2 added to the gradient) or AdamW (decoupled=True) over `params`, its rate
    annealed from lr to 0 over total_steps steps (torch's CosineAnnealingLR with T_max = total_steps)."""

    def __init__(self, params, *, lr, weight_decay, decoupled, total_steps):
        self.params = list(params)
        self.base_lr, self.lr, self.weight_decay, self.decoupled = lr, lr, weight_decay, decoupled
        self.total_steps, self.steps_done = total_steps, 0
        self.state = {}  # parameter index -> {"step", "exp_avg", "exp_avg_sq"}, made at its first gradient

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        """One Adam update of every parameter that has a gradient (as torch's: the others are not touched),
        then the schedule moves to the next step's rate."""
        stepped = [i for i, p in enumerate(self.params) if p.grad is not None]
        moments = [self._moments(i) for i in stepped]
        fused_adam([self.params[i] for i in stepped], [self.params[i].grad for i in stepped],
                   [m["exp_avg"] for m in moments], [m["exp_avg_sq"] for m in moments], [],
                   [m["step"] for m in moments], fused=True, decoupled_weight_decay=self.decoupled,
                   amsgrad=False, beta1=BETAS[0], beta2=BETAS[1], lr=self.lr, weight_decay=self.weight_decay,
                   eps=EPS, maximize=False)
        self._anneal()

    def _moments(self, i):
        if i not in self.state:
            p = self.params[i]
            # fused kernels keep the step count as a float32 tensor on the parameter's device, as torch's
            self.state[i] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                             "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return self.state[i]

    def _anneal(self):
        """CosineAnnealingLR's recursive form (not the closed form: they differ in the last bits, and the
        recursive one is what torch's runs get)."""
        t, T = self.steps_done + 1, self.total_steps
        if (t - 1 - T) % (2 * T) == 0:  # past the end, the cosine's second half climbs back
            self.lr = self.lr + self.base_lr * (1 - math.cos(math.pi / T)) / 2
        else:
            self.lr = (1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T)) * self.lr
        self.steps_done = t

    def state_dict(self):
        return {"lr": self.lr, "steps_done": self.steps_done, "state": self.state}

    def load_state_dict(self, saved):
        self.lr, self.steps_done = saved["lr"], saved["steps_done"]
        self.state = {int(i): {k: v.to(self.params[int(i)].device) for k, v in m.items()}
                      for i, m in saved["state"].items()}

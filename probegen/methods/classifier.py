"""The shared head C: an MLP with `layers` linear layers of width `hidden`, ReLU, no dropout, no norm."""

from torch import nn


class Classifier(nn.Module):
    def __init__(self, in_dim, out_dim, hidden=256, layers=6):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        mods = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            mods.append(nn.Linear(a, b))
            if i < layers - 1:
                mods.append(nn.ReLU())
        self.net = nn.Sequential(*mods)
        self.dims = dims

    def forward(self, x):
        return self.net(x)  # (B, out_dim)

    def flops(self):
        """Forward FLOPs for one input: 2 x multiply-adds of the linear layers (bias and ReLU ignored)."""
        return sum(2 * a * b for a, b in zip(self.dims[:-1], self.dims[1:]))

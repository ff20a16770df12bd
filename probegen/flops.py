"""FLOPs of a piece of code, counted from the shapes it runs with torch's FLOP formulas.

    flops = count_flops(lambda: model(x))      # 2 x multiply-adds of its matmuls, convolutions, attention

Why not torch.utils.flop_counter.FlopCounterMode itself: its dispatch mode is wrapped in
torch._disable_dynamo, so its first operation imports torch._dynamo, 2-3 s of every process that reports a
method's FLOPs. This mode counts with FlopCounterMode's table (torch.utils.flop_counter.flop_registry) and
its rule for operators missing from it (decompose them and count the parts), so the totals are the same
(tests/test_flops.py, every method on every family).
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class _FlopCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.total = 0

    @classmethod
    def _should_skip_dynamo(cls):
        # False: do not wrap __torch_dispatch__ in torch._disable_dynamo (which imports torch._dynamo).
        # Nothing counted here runs under torch.compile, so there is nothing to disable.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.ops.prim.device.default:
            # as FlopCounterMode: an operator with a composite definition is counted by the operators it is
            # made of (its table is keyed by packet, so it offers every operator its decomposition first)
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


def count_flops(fn):
    """FLOPs of calling fn() (its result is dropped)."""
    counter = _FlopCount()
    with counter:
        fn()
    return counter.total

"""Edge patching the way hook-based libraries do it: one patched forward of the Hugging Face GPT-2 per
hypothesis, with PyTorch hooks on the model's modules (the baseline of the GPT-2-scale benchmark, and an
implementation independent of the graph builder, for the tests).

An edge is (sender, receiver) in the head-level names of `graph_from_hf`: senders "wte", "wpe", "l.h",
"h.l.mlp"; receivers "l.h.q" / "l.h.k" / "l.h.v", "h.l.mlp", "lm_head". Two kinds of hypothesis:

    output_without(absent)   every edge carries the reference run except the `absent` ones, which carry the
                             sender's counterfactual value (sender -> receiver path patching)
    output_with(present)     only the `present` edges carry the live (patched) run; every other edge the
                             counterfactual value (a circuit, as ACDC-style edge patching evaluates it)

A receiver's patched input is its live input minus (live - cf) of its absent senders, or its counterfactual
input plus (live - cf) of its present senders: hooks replace the q/k/v columns of c_attn's output for the
patched heads, the input of ln_2 (the MLP) and of ln_f (the unembedding). The attention output bias is the
same in both runs, so edges from it need no patching.
"""

from collections import defaultdict
from contextlib import contextmanager

import torch


class HookPatcher:
    def __init__(self, model, x_r, x_c):
        self.model, self.body = model, model.transformer
        cfg = self.body.config
        self.L, self.H, self.dh, self.d = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_embd
        self.x_r = x_r
        with torch.no_grad():
            self.cf = self._capture(x_c)

    # ------------------------------------------------------------------------------------------- capture

    def _capture(self, x):
        """One run with recording hooks: leaves, per-layer block inputs, z, mid residuals, MLP outputs."""
        rec = {}
        hooks = self._recorders(rec)
        try:
            self.model(x)
        finally:
            for h in hooks:
                h.remove()
        return rec

    def _recorders(self, rec):
        b = self.body
        hooks = [b.wte.register_forward_hook(lambda m, i, o: rec.__setitem__("wte", o)),
                 b.wpe.register_forward_hook(lambda m, i, o: rec.__setitem__("wpe", o)),
                 b.ln_f.register_forward_pre_hook(lambda m, i: rec.__setitem__("final", i[0]))]
        for layer, block in enumerate(b.h):
            hooks += [
                block.register_forward_pre_hook(lambda m, i, l=layer: rec.__setitem__(("pre", l), i[0])),
                block.attn.c_attn.register_forward_hook(lambda m, i, o, l=layer: rec.__setitem__(("qkv", l), o)),
                block.attn.c_proj.register_forward_pre_hook(lambda m, i, l=layer: rec.__setitem__(("z", l), i[0])),
                block.ln_2.register_forward_pre_hook(lambda m, i, l=layer: rec.__setitem__(("mid", l), i[0])),
                block.mlp.register_forward_hook(lambda m, i, o, l=layer: rec.__setitem__(f"h.{l}.mlp", o)),
            ]
        return hooks

    def value(self, rec, sender):
        """A sender's value (N, T, d) in a recorded run (a head's: its z times its rows of c_proj, cached)."""
        if sender in rec:
            return rec[sender].expand_as(rec["wte"])
        if ("head", sender) not in rec:
            layer, head = map(int, sender.split("."))
            rows = slice(head * self.dh, (head + 1) * self.dh)
            rec[("head", sender)] = rec[("z", layer)][..., rows] @ self.body.h[layer].attn.c_proj.weight[rows]
        return rec[("head", sender)]

    # --------------------------------------------------------------------------------------------- patch

    def output_without(self, absent):
        """Logits with the edges in `absent` carrying the counterfactual sender value, all others live."""
        return self._patched(absent, present=False)

    def output_with(self, present):
        """Logits with only the edges in `present` live, every other edge carrying the counterfactual value."""
        return self._patched(present, present=True)

    def _patched(self, edges, present):
        by_receiver = defaultdict(list)
        for sender, receiver in edges:
            if not sender.endswith(".bias"):
                by_receiver[receiver].append(sender)
        live = {}
        with torch.no_grad(), self._hooks(live, by_receiver, present):
            return self.model(self.x_r).logits

    def _input(self, live, live_in, cf_in, senders, present):
        """A receiver's patched residual input from the live and counterfactual runs."""
        base = cf_in if present else live_in
        sign = 1 if present else -1
        for s in senders:
            base = base + sign * (self.value(live, s) - self.value(self.cf, s))
        return base

    @contextmanager
    def _hooks(self, live, by_receiver, present):
        hooks = self._recorders(live)
        b = self.body
        try:
            for layer, block in enumerate(b.h):
                hooks.append(block.attn.c_attn.register_forward_hook(self._qkv_hook(layer, live, by_receiver, present)))
                hooks.append(block.ln_2.register_forward_pre_hook(
                    self._input_hook(f"h.{layer}.mlp", ("mid", layer), live, by_receiver, present)))
            hooks.append(b.ln_f.register_forward_pre_hook(self._input_hook("lm_head", "final", live, by_receiver,
                                                                           present)))
            yield
        finally:
            for h in hooks:
                h.remove()

    def _input_hook(self, receiver, key, live, by_receiver, present):
        def hook(module, args):
            if receiver not in by_receiver:
                return (self.cf[key],) if present else None  # no live edge: the counterfactual input as it is
            return (self._input(live, args[0], self.cf[key], by_receiver[receiver], present),)
        return hook

    def _qkv_hook(self, layer, live, by_receiver, present):
        block, d, dh = self.body.h[layer], self.d, self.dh
        W, bias = block.attn.c_attn.weight, block.attn.c_attn.bias

        def hook(module, args, out):  # out (N, T, 3d): [q | k | v], head-major inside each
            # with `present`, a head slot without live edges reads the counterfactual input: cf's columns
            out = (self.cf[("qkv", layer)] if present else out).clone()
            for head in range(self.H):
                for k, slot in enumerate("qkv"):
                    receiver = f"{layer}.{head}.{slot}"
                    if receiver not in by_receiver:
                        continue
                    x = self._input(live, live[("pre", layer)], self.cf[("pre", layer)], by_receiver[receiver],
                                    present)
                    cols = slice(k * d + head * dh, k * d + (head + 1) * dh)
                    out[..., cols] = block.ln_1(x) @ W[:, cols] + bias[cols]
            return out
        return hook

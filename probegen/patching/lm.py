"""Path-patching graphs of decoder-only transformer language models, shared by the adapters.

An adapter (hf.py for Hugging Face GPT-2, lens.py for TransformerLens) describes a model as an `LMSpec`: its
embeddings, each layer's LayerNorms, attention weights and MLP, the final LayerNorm + unembedding, and the
library's naming conventions. `build_graph(spec, granularity, per_position, logits)` turns it into a Graph:

    leaves   token embedding, position embedding (when it enters the residual stream), and at head
             granularity one constant leaf per layer for the attention output bias (b_O / c_proj.bias), so
             that the heads' outputs plus the bias equal the attention output exactly
    nodes    granularity "head":  every head "l.h" with slots q, k, v, and every MLP
             granularity "layer": every attention layer (slots q, k, v) and every MLP
             granularity "block": every transformer block (one slot)
    output   the unembedding (final LayerNorm included)

LayerNorm is part of the *receiving* node's function: a head computes ln_1 of each of its q / k / v slot sums,
an MLP ln_2 of its slot sum, the output ln_f. So the LayerNorm statistics of a receiver are those of its
actual (treeified) input, which mixes the reference and counterfactual values of the paths that enter it;
a path carries a sender's value into the sum *before* the normalisation, and no path goes "through" a
LayerNorm on its own. (This is the model's own computation; nothing is frozen or linearised.)

per_position=True splits every leaf and node by position ("1.5@3": head 1.5 at query position 3, "wte@0");
a node at position t writes only row t of its (B, T, d) value, a head at t reads its query from position t
and its keys / values from the positions it attends to. Memory grows by a factor T: for small models.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from probegen.errors import ProbegenError
from probegen.patching.graph import Graph, Node, slot_sum
from probegen.patching.paths import parse_hypothesis

GRANULARITIES = ("head", "layer", "block")


@dataclass(frozen=True)
class Names:
    """A library's naming conventions for the graph's leaves and nodes."""
    tok: str
    pos: str
    attn: str  # "h.{l}.attn"
    mlp: str  # "h.{l}.mlp"
    block: str  # "h.{l}"
    bias: str  # "h.{l}.attn.c_proj.bias"
    out: str
    norms: tuple  # LayerNorm names that are NOT nodes, for the error message ("ln_1", "ln_2", "ln_f")
    head: str = "{l}.{h}"


class LMSpec(ABC):
    """What the graph builder needs from a model. Subclasses (hf.GPT2Spec, lens.LensSpec) set the attributes
    and implement the abstract methods; a subclass missing one cannot be instantiated."""

    names: Names
    n_layers: int
    n_heads: int
    d_head: int
    n_ctx: int
    causal: bool = True
    has_mlp: bool = True
    shortformer: bool = False  # positions added to the q and k inputs of every head, not to the residual

    @abstractmethod
    def embed(self, tokens):
        """tokens (B, T) -> (token embedding (B, T, d), position embedding (B, T, d) or None)."""
        ...

    def shortformer_pos(self, T):
        """(T, d) positional embedding added to q and k inputs: only specs with shortformer = True define it."""
        raise ProbegenError(f"{type(self).__name__}: shortformer = True needs a shortformer_pos(T) method")

    @abstractmethod
    def ln1(self, layer, x):
        """The layer's first LayerNorm (before attention), as the model applies it."""
        ...

    @abstractmethod
    def ln2(self, layer, x):
        """The layer's second LayerNorm (before the MLP)."""
        ...

    @abstractmethod
    def mlp(self, layer, x):
        """The MLP on an already normalised input."""
        ...

    @abstractmethod
    def unembed(self, x):
        """Final LayerNorm (if any) and unembedding: (N, ..., d) -> logits."""
        ...

    @abstractmethod
    def raw_weights(self, layer):
        """The layer's attention weights as the model holds them (views are fine): W_Q, W_K, W_V (d, H*dh),
        b_Q, b_K, b_V (H*dh,), W_O (H*dh, d), b_O (d,), head-major along H*dh."""
        ...

    @abstractmethod
    def params(self, layer):
        """The model's own parameter tensors behind raw_weights (the cache of `weights` is keyed on them)."""
        ...

    @abstractmethod
    def scale(self, layer):
        """The factor the model multiplies q . k by before the softmax."""
        ...

    upcast_scores = False  # compute q . k and the softmax in float32 (HF's reorder_and_upcast_attn, eager)

    @abstractmethod
    def attn_proj(self, layer, z):
        """Whole-layer output (bias included) from z (N, T, H*dh), as the model computes it."""
        ...

    def weights(self, layer):
        """Copies of raw_weights: q, k, v side by side ("W_qkv" (d, 3*H*dh), "b_qkv"; "fused" holds views of
        its three column blocks and contiguous W_O, b_O) and per head (H, d, dh) / (H, dh, d), rebuilt when a
        parameter of the model changes (its storage or version counter)."""
        key = tuple((t.data_ptr(), t._version) for t in self.params(layer))
        cache = self.__dict__.setdefault("_weights_cache", {})
        if cache.get(layer, (None,))[0] != key:
            H, dh = self.n_heads, self.d_head
            W_Q, W_K, W_V, b_Q, b_K, b_V, W_O, b_O = (t.detach() for t in self.raw_weights(layer))
            per_head = lambda W: W.reshape(W.shape[0], H, dh).permute(1, 0, 2).contiguous()  # (H, d, dh)
            W_qkv, b_qkv = torch.cat([W_Q, W_K, W_V], 1), torch.cat([b_Q, b_K, b_V])
            cache[layer] = (key, {
                "W_qkv": W_qkv, "b_qkv": b_qkv,
                "fused": W_qkv.split(H * dh, 1) + b_qkv.split(H * dh) + (W_O.contiguous(), b_O.contiguous()),
                "W": (per_head(W_Q), per_head(W_K), per_head(W_V)),
                "b": (b_Q.view(H, dh), b_K.view(H, dh), b_V.view(H, dh)),
                "W_O": W_O.contiguous().view(H, dh, -1)})
        return cache[layer][1]

    def qkv(self, layer):
        return self.weights(layer)["fused"]

    def ln1_of(self, layer, x):
        """ln1 with a one-entry memo: the heads of a layer called in a row on the same tensor share it."""
        memo = self.__dict__.get("_ln1_memo")
        if memo is not None and memo[0] == layer and memo[1] is x:
            return memo[2]
        out = self.ln1(layer, x)
        self.__dict__["_ln1_memo"] = (layer, x, out)
        return out

    def check_tokens(self, tokens):
        if not torch.is_tensor(tokens) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ProbegenError(f"model input: expected integer token ids of shape (batch, seq), got "
                                f"{type(tokens).__name__} {getattr(tokens, 'shape', '')}")
        if tokens.shape[1] > self.n_ctx:
            raise ProbegenError(f"model input: sequence length {tokens.shape[1]} > the model's context {self.n_ctx}")


# ------------------------------------------------------------------------------------------------ attention


def _proj(x, w, slot, heads, dh):
    """x (N, T, d) through the q / k / v weights (slot 0 / 1 / 2) of `heads` -> (N, H', T, dh)."""
    if len(heads) == 1:  # one head: its own contiguous (d, dh) block
        h = heads[0]
        return torch.addmm(w["b"][slot][h], x.flatten(0, -2), w["W"][slot][h]).view(*x.shape[:-1], 1, dh).transpose(-3, -2)
    cols = _head_cols(heads, dh)
    out = x @ w["fused"][slot][:, cols] + w["fused"][3 + slot][cols]
    return out.view(*x.shape[:-1], len(heads), dh).transpose(-3, -2)


def _proj_qkv(x, w, H, dh):
    """x (N, T, d) through the q, k and v weights of every head at once -> three (N, H, T, dh)."""
    out = torch.addmm(w["b_qkv"], x.flatten(0, -2), w["W_qkv"]).view(*x.shape[:-1], 3, H, dh)
    return tuple(out.select(-3, i).transpose(-3, -2) for i in range(3))


def _head_cols(heads, dh):
    if heads == list(range(heads[0], heads[-1] + 1)):
        return slice(heads[0] * dh, (heads[-1] + 1) * dh)  # contiguous: a view, no gather
    return torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in heads])


def attend(spec, layer, heads, q_in, k_in, v_in, q_pos):
    """z (N, Tq, H', dh) of `heads` of `layer`: queries from q_in (N, Tq, d) at positions q_pos (Tq,), keys and
    values from k_in, v_in (N, Tk, d) at positions 0 .. Tk-1. The slot values are raw residual sums: the
    model's ln_1 (and shortformer positions) are applied here."""
    w = spec.weights(layer)
    xq = spec.ln1_of(layer, q_in)
    xk = xq if k_in is q_in else spec.ln1_of(layer, k_in)
    xv = xk if v_in is k_in else spec.ln1_of(layer, v_in)
    Tq, Tk = q_in.shape[-2], k_in.shape[-2]
    if spec.shortformer:
        pos = spec.shortformer_pos(max(Tk, int(q_pos.max()) + 1))
        xq, xk = xq + pos[q_pos], xk + pos[:Tk]
    dh = spec.d_head
    if xq is xk and xk is xv and len(heads) == spec.n_heads and len(heads) > 1:
        q, k, v = _proj_qkv(xq, w, len(heads), dh)  # one matmul for all three, as the model's c_attn
    else:
        q, k, v = _proj(xq, w, 0, heads, dh), _proj(xk, w, 1, heads, dh), _proj(xv, w, 2, heads, dh)
    k_pos = torch.arange(Tk, device=q_pos.device)
    # causal: key s is visible from query t iff s <= t; none is hidden when every query sees all keys
    hidden = spec.causal and bool((k_pos[None, :] > q_pos[:, None]).any())
    if spec.upcast_scores:
        scores = (q.float() @ k.float().transpose(-1, -2)) * spec.scale(layer)  # (N, H', Tq, Tk)
        if hidden:
            scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        z = scores.softmax(-1).to(v.dtype) @ v
    else:
        aligned = hidden and Tq == Tk and bool((q_pos == k_pos).all())
        mask = None if not hidden or aligned else k_pos[None, :] <= q_pos[:, None]
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=aligned, scale=spec.scale(layer))
    return z.transpose(-3, -2)  # (N, Tq, H', dh)


def attend_at(spec, layer, heads, t, q, k, v):
    """attend for a node at query position t (None: every position) on full-length slot values (N, T, d)."""
    if t is None:
        return attend(spec, layer, heads, q, k, v, torch.arange(q.shape[-2], device=q.device))
    same_kv = v is k
    q, q_pos = q[:, t:t + 1], torch.tensor([t], device=q.device)
    if spec.causal:
        k = k[:, :t + 1]
        v = k if same_kv else v[:, :t + 1]
    return attend(spec, layer, heads, q, k, v, q_pos)


def heads_each(spec, layer, heads, t, q, k, v):
    """Each head's own output (no bias) for several heads of a layer reading the same q, k, v (N, T, d): one
    attention call and one batched product with their W_O blocks -> (H', N, T, d)."""
    z = attend_at(spec, layer, heads, t, q, k, v)  # (N, Tq, H', dh)
    W_O = spec.weights(layer)["W_O"]  # (H, dh, d)
    W_O = W_O[heads[0]:heads[-1] + 1] if heads == list(range(heads[0], heads[-1] + 1)) else W_O[heads]
    N, Tq, Hs, dh = z.shape
    out = torch.bmm(z.permute(2, 0, 1, 3).reshape(Hs, N * Tq, dh), W_O).view(Hs, N, Tq, -1)
    if t is None:
        return out
    full = out.new_zeros(Hs, N, q.shape[-2], out.shape[-1])
    full[:, :, t] = out[:, :, 0]
    return full


def heads_out(spec, layer, heads, z):
    """Sum of the outputs of `heads` (no bias) from their z (N, T, H', dh) -> (N, T, d)."""
    w = spec.weights(layer)
    if len(heads) == 1:
        return z.flatten(-2) @ w["W_O"][heads[0]]
    return z.flatten(-2) @ w["fused"][6][_head_cols(heads, spec.d_head)]


# -------------------------------------------------------------------------------------------------- graph


class LMGraph(Graph):
    """A Graph built from a language model, with its naming conventions.

    Its plain forward (`run`, used for the reference and counterfactual caches) shares slot sums between
    receivers whose sender lists start alike (every head of a layer reads the same residual stream): a sum
    is continued from the longest already-computed prefix. Left-to-right order is kept, so every value is
    bit-identical to Graph.run's; it only avoids re-adding the same prefix for each of H heads x 3 slots.

    For the engine: the heads of a layer (at one position) form one step, and `call_group` computes the heads
    that read the same q / k / v inputs in one attention call (`heads_each`) instead of one call per head; and
    `exact_sums = False` lets slot inputs be cached sums plus the few senders' differences (engine._SlotSums).
    Both agree with the per-node computation to float rounding, not bit for bit.
    """

    exact_sums = False

    def __init__(self, spec, granularity, per_position, logits, *args, head_units=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec, self.granularity, self.per_position, self.logits = spec, granularity, per_position, logits
        self.head_units = dict(head_units or {})  # head node -> (layer, head, position or None)
        self._head_name = {unit: name for name, unit in self.head_units.items()}
        self._steps = self._head_steps()

    @property
    def steps(self):
        return self._steps

    def _head_steps(self):
        """graph.order with consecutive heads of one layer and position merged into one step."""
        steps, last = [], None
        for name in self.order:
            unit = self.head_units.get(name)
            group = None if unit is None else (unit[0], unit[2])
            if group is not None and group == last:
                steps[-1].append(name)
            else:
                steps.append([name])
            last = group
        return steps

    def call_group(self, items):
        """Heads that read the same (q, k, v) tensors run together, and so do inputs read by the same heads
        (stacked on the batch axis): one attention call per set of heads instead of one per head."""
        if len(items) == 1 or items[0][0] not in self.head_units:
            return super().call_group(items)
        layer, _, t = self.head_units[items[0][0]]
        inputs, heads_of = {}, {}  # (ids of q, k, v) -> slot values / the heads that read them
        for name, slots in items:
            key = tuple(id(slots[q]) for q in "qkv")  # the engine hands equal sums over as one tensor
            inputs[key] = slots
            head = self.head_units[name][1]
            if head not in heads_of.setdefault(key, []):
                heads_of[key].append(head)
        by_heads = {}
        for key, heads in heads_of.items():
            by_heads.setdefault(tuple(sorted(heads)), []).append(key)
        out = {}
        for heads, keys in by_heads.items():
            if len(heads) == 1:  # a lone head: its node's own function
                values = self.call_batch(self._head_name[(layer, heads[0], t)], [inputs[k] for k in keys])
                out.update({(k, heads[0]): v for k, v in zip(keys, values)})
                continue
            each = heads_each(self.spec, layer, list(heads), t, **_stack([inputs[k] for k in keys]))
            n = inputs[keys[0]]["q"].shape[0]
            for i, k in enumerate(keys):
                out.update({(k, h): each[j, i * n:(i + 1) * n] for j, h in enumerate(heads)})
        return [out[(tuple(id(slots[q]) for q in "qkv"), self.head_units[name][1])] for name, slots in items]

    def run(self, x=None, leaves=None):
        values = dict(self.leaf_values(x) if leaves is None else leaves)
        sums = {}
        self.spec.__dict__.pop("_ln1_memo", None)  # the memo lives within one run of consecutive heads
        for name in self.order:
            slots = {q: shared_sum(senders, values, sums) for q, senders in self.nodes[name].slots.items()}
            values[name] = self.call(name, slots)
        return values

    def hypothesis(self, text):
        """parse_hypothesis with errors that explain this model's names (heads out of range, LayerNorms)."""
        for token in _path_tokens(text):
            message = None if self.has(token) else self.explain_unknown(token, text)
            if message:
                raise ProbegenError(message)
        return parse_hypothesis(self, text)

    def explain_unknown(self, token, text):
        """One line on why `token` names nothing in this graph; None when it is a node with a wrong slot (the
        parser's message, which lists the slots, says it best)."""
        spec, names = self.spec, self.spec.names
        base = token.split("@")[0]
        for norm in names.norms:
            if base == norm or base.endswith("." + norm):
                return (f"path {text!r}: {token!r} is a LayerNorm, not a node or slot: each LayerNorm is part of the "
                        f"node that reads it (the one before attention: the head's q/k/v slots; before the MLP: "
                        f"the MLP; the final one: {names.out!r})")
        parts = base.split(".")
        if len(parts) in (2, 3) and parts[0].isdigit() and parts[1].isdigit():
            layer, head = int(parts[0]), int(parts[1])
            if self.granularity != "head":
                return f"path {text!r}: head {token!r}: this graph has {self.granularity} granularity (no head nodes)"
            if layer >= spec.n_layers or head >= spec.n_heads:
                return (f"path {text!r}: head {'.'.join(parts[:2])!r} is not in the model: {spec.n_layers} layers x "
                        f"{spec.n_heads} heads (0.0 .. {spec.n_layers - 1}.{spec.n_heads - 1})")
        if "@" in token and not self.per_position:
            return f"path {text!r}: {token!r}: positions ('@t') exist only in a graph built with per_position=True"
        if self.has(token.rpartition(".")[0]):
            return None
        return f"path {text!r}: unknown node {token!r} (nodes are named like {', '.join(self._examples())})"

    def _examples(self):
        return [repr(n) for n in (self.inputs[:1] + self.order[:2] + [self.output])]


def _stack(slot_dicts):
    """Slot values of several inputs stacked on the batch axis; a tensor shared by two slots stays shared."""
    if len(slot_dicts) == 1:
        return dict(slot_dicts[0])
    stacked, out = {}, {}
    for q in slot_dicts[0]:
        parts = [sd[q] for sd in slot_dicts]
        key = tuple(map(id, parts))
        if key not in stacked:
            stacked[key] = torch.cat(parts)
        out[q] = stacked[key]
    return out


def shared_sum(senders, values, sums):
    if senders not in sums:
        start, total = 0, None
        for k in range(len(senders) - 1, 0, -1):
            if senders[:k] in sums:
                start, total = k, sums[senders[:k]]
                break
        rest = [values[s] for s in senders[start:]]
        total = slot_sum(rest) if total is None else slot_sum([total] + rest)
        sums[senders] = total
    return sums[senders]


def _path_tokens(text):
    if not isinstance(text, str):
        return []
    body = text.replace("{", ",").replace("}", ",").replace(" - ", ",")
    return [tok.strip() for part in body.split(",") for tok in part.split("->") if tok.strip() not in ("", "...")]


# ------------------------------------------------------------------------------------------------ builder


def build_graph(spec, granularity="head", per_position=False, logits="all"):
    """The model as an LMGraph; the raw input is the token tensor (B, T). logits: "all" -> output (B, T, V),
    "last" -> (B, V) at the last position only (cheaper when only the next-token prediction matters)."""
    if granularity not in GRANULARITIES:
        raise ProbegenError(f"granularity: expected one of {list(GRANULARITIES)}, got {granularity!r}")
    if logits not in ("all", "last"):
        raise ProbegenError(f"logits: expected 'all' or 'last', got {logits!r}")
    if per_position is not False and not (isinstance(per_position, int) and per_position > 0):
        raise ProbegenError(f"per_position: expected False or the sequence length (a positive int), got {per_position!r}")
    if per_position and per_position > spec.n_ctx:
        raise ProbegenError(f"per_position: {per_position} > the model's context {spec.n_ctx}")
    builder = _Builder(spec, granularity, per_position or None)
    return builder.graph(logits)


class _Builder:
    """Declares leaves and nodes layer by layer, keeping the residual stream's senders (per position)."""

    def __init__(self, spec, granularity, T):
        self.spec, self.granularity, self.T = spec, granularity, T
        self.positions = list(range(T)) if T else [None]
        self.leaves, self.nodes = [], []
        self.resid = {t: [] for t in self.positions}  # senders writing position t (None: all positions)
        self.head_units = {}  # head node -> (layer, head, t), at head granularity

    def name(self, base, t):
        return base if t is None else f"{base}@{t}"

    def graph(self, logits):
        spec, names = self.spec, self.spec.names
        for t in self.positions:
            self.leaves.append(self.name(names.tok, t))
            self.resid[t].append(self.leaves[-1])
            if not spec.shortformer:
                self.leaves.append(self.name(names.pos, t))
                self.resid[t].append(self.leaves[-1])
        biases = {}
        for layer in range(spec.n_layers):
            if self.granularity == "block":
                self.add_block(layer)
                continue
            self.add_attention(layer)
            if self.granularity == "head":
                for t in self.positions:  # a constant leaf: the bias belongs to no head
                    biases[self.name(names.bias.format(l=layer), t)] = (layer, t)
                    self.resid[t].append(self.name(names.bias.format(l=layer), t))
            if spec.has_mlp:
                self.add_mlp(layer)
        self.leaves += list(biases)
        every = tuple(s for t in self.positions for s in self.resid[t])
        last = logits == "last"
        out = Node(names.out, lambda resid: spec.unembed(resid[:, -1] if last else resid), {"resid": every})
        return LMGraph(spec, self.granularity, bool(self.T), logits, self.leaves, self.nodes + [out], names.out,
                       embed=self.embedder(biases), head_units=self.head_units)

    def embedder(self, biases):
        spec, names, positions = self.spec, self.spec.names, self.positions

        def embed(tokens):
            spec.check_tokens(tokens)
            if self.T is not None and tokens.shape[1] != self.T:
                raise ProbegenError(f"model input: this per-position graph was built for length {self.T}, got "
                                    f"{tokens.shape[1]}")
            tok, pos = spec.embed(tokens)
            values = {}
            for t in positions:
                values[self.name(names.tok, t)] = _only_row(tok, t)
                if pos is not None:
                    values[self.name(names.pos, t)] = _only_row(pos, t)
            for name, (layer, t) in biases.items():
                values[name] = _only_row(spec.qkv(layer)[7].expand_as(tok), t)  # identical in x_r and x_c
            return values
        return embed

    def kv_senders(self, t):
        """Senders of a key / value slot of a node at query position t."""
        if t is None:
            return tuple(self.resid[None])
        visible = range(t + 1) if self.spec.causal else self.positions
        return tuple(s for u in visible for s in self.resid[u])

    def add_attention(self, layer):
        spec, names = self.spec, self.spec.names
        units = ([([h], names.head.format(l=layer, h=h)) for h in range(spec.n_heads)] if self.granularity == "head"
                 else [(list(range(spec.n_heads)), names.attn.format(l=layer))])
        written = {t: [] for t in self.positions}
        for heads, base in units:
            for t in self.positions:
                slots = {"q": tuple(self.resid[t]), "k": self.kv_senders(t), "v": self.kv_senders(t)}
                name = self.name(base, t)
                self.nodes.append(Node(name, self._attn_fn(layer, heads, t), slots))
                if self.granularity == "head":
                    self.head_units[name] = (layer, heads[0], t)
                written[t].append(name)
        for t in self.positions:
            self.resid[t] += written[t]

    def _attn_fn(self, layer, heads, t):
        spec, whole = self.spec, self.granularity != "head"

        def fn(q, k, v):  # (N, T, d) each: raw residual sums of the slot's senders
            z = attend_at(spec, layer, heads, t, q, k, v)  # (N, Tq, H', dh)
            out = spec.attn_proj(layer, z.flatten(-2)) if whole else heads_out(spec, layer, heads, z)
            return out if t is None else _place_row(out, t, q.shape[-2])
        return fn

    def add_mlp(self, layer):
        spec, names = self.spec, self.spec.names
        for t in self.positions:
            name = self.name(names.mlp.format(l=layer), t)

            def fn(resid, t=t):
                x = resid if t is None else resid[:, t:t + 1]
                out = spec.mlp(layer, spec.ln2(layer, x))
                return out if t is None else _place_row(out, t, resid.shape[-2])
            self.nodes.append(Node(name, fn, {"resid": tuple(self.resid[t])}))
        for t in self.positions:
            self.resid[t].append(self.name(names.mlp.format(l=layer), t))

    def add_block(self, layer):
        spec, names = self.spec, self.spec.names
        all_heads = list(range(spec.n_heads))
        for t in self.positions:
            name = self.name(names.block.format(l=layer), t)

            def fn(resid, t=t):
                T = resid.shape[-2]
                if t is None:
                    q, kv, q_pos = resid, resid, torch.arange(T, device=resid.device)
                else:
                    kv = resid[:, :t + 1] if spec.causal else resid
                    q, q_pos = resid[:, t:t + 1], torch.tensor([t], device=resid.device)
                attn = spec.attn_proj(layer, attend(spec, layer, all_heads, q, kv, kv, q_pos).flatten(-2))
                out = attn + spec.mlp(layer, spec.ln2(layer, q + attn)) if spec.has_mlp else attn
                return out if t is None else _place_row(out, t, T)
            # a block reads its queries at t and its keys/values at the visible positions: one slot, fed by all
            self.nodes.append(Node(name, fn, {"resid": self.kv_senders(t)}))
        for t in self.positions:
            self.resid[t].append(self.name(names.block.format(l=layer), t))


def _only_row(x, t):
    """(B, T, d) -> the same with every row but t zero (t None: unchanged)."""
    if t is None:
        return x
    out = torch.zeros_like(x)
    out[:, t] = x[:, t]
    return out


def _place_row(row, t, T):
    """(N, 1, d) -> (N, T, d), zero except row t."""
    out = row.new_zeros(row.shape[0], T, row.shape[-1])
    out[:, t] = row[:, 0]
    return out

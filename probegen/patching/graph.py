"""Computational graphs for path patching: named nodes, each a function of named input slots.

A model declares its graph explicitly:

    Graph(inputs=["emb"], nodes=[Node("0.0", head_fn, {"q": ("emb",), "k": ("emb",), "v": ("emb",)}), ...,
                                 Node("out", unembed, {"resid": ("emb", "0.0", ...)})], output="out",
          embed=lambda tokens: {"emb": W_E[tokens]})

- `inputs` are the leaves. Their values come from the raw input x through `embed(x) -> {leaf: tensor}`;
  without `embed`, x is that dict itself (or a bare tensor when there is exactly one leaf).
- A slot's value is the SUM of its senders' values, in the declared order (a residual stream); a node that
  needs separate inputs (a concatenation, a product) declares one slot per input.
- Every value is a tensor whose first axis is the batch. Node functions must treat it as independent rows:
  the engine stacks several patched copies on that axis to evaluate many hypotheses in one call.
- Node names may contain dots ("1.1"); a path refers to a slot as "<node>.<slot>" ("1.1.k").

`graph_from_fx(module)` builds the graph of a simple module (e.g. nn.Sequential) with torch.fx instead.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch

from probegen.errors import ProbegenError

_FORBIDDEN = (",", "{", "}", "->", " ")


@dataclass
class Node:
    name: str
    fn: Callable  # fn(**{slot: tensor}) -> tensor
    slots: dict = field(default_factory=dict)  # slot name -> tuple of sender node names


class Graph:
    def __init__(self, inputs, nodes, output, embed=None):
        self.inputs = list(inputs)
        self.nodes = {n.name: n for n in nodes}
        self.output = output
        self.embed = embed
        self._check(self.inputs + [n.name for n in nodes])
        self.order = self._topological_order()  # non-leaf nodes, senders before receivers
        self._sender_prefixes = None  # built on first use (sender_prefixes)
        self._receivers = {name: [] for name in self.inputs + list(self.nodes)}
        for r in self.order:
            for q, senders in self.nodes[r].slots.items():
                for s in senders:
                    self._receivers[s].append((r, q))

    # ----------------------------------------------------------------------------------- declaration checks

    def _check(self, names):
        for name in names:
            if not name or name == "..." or any(s in name for s in _FORBIDDEN):
                raise ProbegenError(f"graph node name {name!r}: must be non-empty, not '...', without , {{ }} -> or spaces")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ProbegenError(f"graph: duplicate node name(s) {sorted(dup)}")
        if self.output not in self.nodes:
            raise ProbegenError(f"graph output {self.output!r}: not a (non-input) node")
        for node in self.nodes.values():
            if not node.slots:
                raise ProbegenError(f"graph node {node.name!r}: has no input slots (declare it as an input instead)")
            for slot, senders in node.slots.items():
                if not senders:
                    raise ProbegenError(f"graph node {node.name!r} slot {slot!r}: has no senders")
                if len(set(senders)) != len(senders):
                    raise ProbegenError(f"graph node {node.name!r} slot {slot!r}: lists a sender twice")
                for s in senders:
                    if s not in self.inputs and s not in self.nodes:
                        raise ProbegenError(f"graph node {node.name!r} slot {slot!r}: unknown sender {s!r}")

    def _topological_order(self):
        order, state = [], {}

        def visit(name, stack):
            if name in self.inputs or state.get(name) == "done":
                return
            if state.get(name) == "active":
                raise ProbegenError(f"graph: cycle through {' -> '.join(stack + [name])}")
            state[name] = "active"
            for senders in self.nodes[name].slots.values():
                for s in senders:
                    visit(s, stack + [name])
            state[name] = "done"
            order.append(name)

        visit(self.output, [])
        return order  # nodes that cannot reach the output are never evaluated

    # ------------------------------------------------------------------------------------------ structure

    def is_leaf(self, name):
        return name in self.inputs

    def has(self, name):
        return name in self.nodes or name in self.inputs

    def slots(self, name):
        return {} if self.is_leaf(name) else self.nodes[name].slots

    def receivers(self, name):
        """[(receiver, slot)] that `name` feeds (receivers that reach the output only)."""
        return self._receivers[name]

    def reaches(self, a, b):
        """Is there a directed path (possibly empty) from node a to node b?"""
        seen, todo = set(), [a]
        while todo:
            n = todo.pop()
            if n == b:
                return True
            if n not in seen:
                seen.add(n)
                todo += [r for r, _ in self.receivers(n)]
        return False

    def sender_prefixes(self):
        """{senders: the longest other slot's sender tuple that is a proper prefix of it, or None}. In a residual
        stream every layer reads what the one before it read plus that layer's outputs, so a slot sum can be
        continued from an earlier slot's sum. Found with a trie: linear in the total length of the tuples."""
        if getattr(self, "_sender_prefixes", None) is None:
            tuples = {senders for node in self.nodes.values() for senders in node.slots.values()}
            trie, END = {}, object()
            for senders in tuples:
                level = trie
                for s in senders:
                    level = level.setdefault(s, {})
                level[END] = senders
            parents = {}
            for senders in tuples:
                level, best = trie, None
                for s in senders[:-1]:
                    level = level[s]
                    best = level.get(END, best)
                parents[senders] = best
            self._sender_prefixes = parents
        return self._sender_prefixes

    def count_paths(self):
        """Number of input -> output paths (slot-resolved), without enumerating them."""
        count = {leaf: 1 for leaf in self.inputs}
        for name in self.order:
            count[name] = sum(count[s] for senders in self.nodes[name].slots.values() for s in senders)
        return count[self.output]

    # -------------------------------------------------------------------------------------------- running

    def leaf_values(self, x):
        """Raw input -> {leaf: tensor (B, ...)}."""
        if self.embed is not None:
            values = self.embed(x)
        elif isinstance(x, dict):
            values = x
        elif torch.is_tensor(x) and len(self.inputs) == 1:
            values = {self.inputs[0]: x}
        else:
            raise ProbegenError(f"graph input: expected a dict with keys {self.inputs}, got {type(x).__name__}")
        missing = [leaf for leaf in self.inputs if leaf not in values]
        if missing:
            raise ProbegenError(f"graph input: missing leaf value(s) {missing}")
        return {leaf: values[leaf] for leaf in self.inputs}

    def call(self, name, slot_values):
        """Run node `name` on {slot: tensor}; its output must be a tensor with its inputs' batch size."""
        out = self.nodes[name].fn(**slot_values)
        if not torch.is_tensor(out):
            raise ProbegenError(f"graph node {name!r}: returned {type(out).__name__}; path patching needs tensor outputs")
        # The engine stacks patched copies on the batch axis, so a node that mixes rows gives wrong answers;
        # a changed batch size is the cheap, sure sign of one that reduces over the batch.
        batch = next((v.shape[0] for v in slot_values.values() if torch.is_tensor(v) and v.dim()), None)
        if batch is not None and (out.dim() == 0 or out.shape[0] != batch):
            raise ProbegenError(f"graph node {name!r}: output of shape {tuple(out.shape)} for inputs of batch "
                                f"size {batch}; node functions must keep the batch axis and treat rows independently")
        return out

    def call_batch(self, name, slot_values_list):
        """Node `name` on several inputs in one call, stacked on the batch axis: one output per input."""
        if len(slot_values_list) == 1:
            return [self.call(name, slot_values_list[0])]
        slots = {q: torch.cat([sv[q] for sv in slot_values_list]) for q in slot_values_list[0]}
        sizes = [next(iter(sv.values())).shape[0] for sv in slot_values_list]
        return list(self.call(name, slots).split(sizes))

    @property
    def steps(self):
        """The evaluation order in steps: lists of nodes that read none of each other, senders before receivers.
        Each node is a step of its own here; a subclass that can compute several nodes in one call (the heads of
        a layer) groups them, and computes a step's nodes together in `call_group`."""
        return [[name] for name in self.order]

    def call_group(self, items):
        """[(node, {slot: tensor})] of one step -> one output per item (here: each node's items in one call)."""
        by_node = {}
        for i, (name, slots) in enumerate(items):
            by_node.setdefault(name, []).append(i)
        out = [None] * len(items)
        for name, idx in by_node.items():
            for i, value in zip(idx, self.call_batch(name, [items[i][1] for i in idx])):
                out[i] = value
        return out

    def run(self, x=None, leaves=None):
        """Ordinary forward pass: {node: value} for every leaf and every node that reaches the output."""
        values = dict(self.leaf_values(x) if leaves is None else leaves)
        for name in self.order:
            slots = {q: slot_sum(values[s] for s in senders) for q, senders in self.nodes[name].slots.items()}
            values[name] = self.call(name, slots)
        return values

    def __call__(self, x):
        return self.run(x)[self.output]


def slot_sum(values):
    """Sum in the given order (the engine and the plain forward must add identically, bit for bit)."""
    it = iter(values)
    return sum_onto(next(it), it)


def sum_onto(total, values):
    """total + v1 + v2 + ..., left to right. `total` itself is never modified: the first addition makes a new
    tensor, and later ones accumulate into it in place (the same roundings as out-of-place adds, bit for bit,
    without a fresh allocation per term). A term that would change the result's shape or dtype (broadcasting,
    promotion) is added out of place."""
    fresh = False
    for v in values:
        if fresh and v.shape == total.shape and v.dtype == total.dtype:
            total += v
        else:
            total, fresh = total + v, True
    return total


# ---------------------------------------------------------------------------------------------- torch.fx


def graph_from_fx(module, leaf_modules=()):
    """Graph of `module` traced by torch.fx: one node per submodule call / function call, one slot per tensor
    argument ("in" when there is one, else "arg0", "arg1", ... / keyword names), leaves = forward's arguments.

    Granularity: standard torch.nn layers are nodes; pass `leaf_modules` (qualified submodule names, e.g.
    {"block1"}) to keep a custom submodule as one node instead of tracing into it.
    """
    import torch.fx as fx

    keep = set(leaf_modules)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return qualname in keep or super().is_leaf_module(m, qualname)

    try:
        traced = fx.GraphModule(module, Tracer().trace(module))
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...) for data-dependent code
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ProbegenError(f"torch.fx cannot trace {type(module).__name__}: {first}") from None

    inputs, nodes, names, output = [], [], {}, None
    for n in traced.graph.nodes:
        if n.op == "placeholder":
            names[n] = n.target
            inputs.append(n.target)
        elif n.op in ("call_module", "call_function", "call_method"):
            names[n] = _fx_name(n, set(names.values()))
            nodes.append(_fx_node(traced, n, names))
        elif n.op == "get_attr":
            raise ProbegenError(f"torch.fx graph of {type(module).__name__}: parameter access {n.target!r} outside a "
                                "submodule is not supported; wrap it in a module")
        elif n.op == "output":
            if not isinstance(n.args[0], fx.Node):
                raise ProbegenError(f"torch.fx graph of {type(module).__name__}: forward must return one tensor")
            output = names[n.args[0]]
    if output in inputs:
        raise ProbegenError(f"torch.fx graph of {type(module).__name__}: forward returns its input unchanged")
    return Graph(inputs, nodes, output)


def _fx_name(n, taken):
    base = str(n.target) if n.op == "call_module" else n.name
    name, i = base, 1
    while name in taken:  # a module called twice becomes two nodes
        name, i = f"{base}#{i}", i + 1
    return name


def _fx_node(traced, n, names):
    import torch.fx as fx

    # Each distinct fx.Node among the (possibly nested) arguments becomes a slot; constants stay in the call.
    arg_nodes = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: arg_nodes.append(a) if a not in arg_nodes else None)
    if not arg_nodes:
        raise ProbegenError(f"torch.fx node {n.name!r}: takes no tensor input (a constant); not supported")
    slot_of = {arg_nodes[0]: "in"} if len(arg_nodes) == 1 else {a: f"arg{i}" for i, a in enumerate(arg_nodes)}
    slots = {q: (names[a],) for a, q in slot_of.items()}
    target = traced.get_submodule(n.target) if n.op == "call_module" else n.target

    def fn(**vals):
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: vals[slot_of[a]])
        if n.op == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return target(*args, **kwargs)

    return Node(names[n], fn, slots)

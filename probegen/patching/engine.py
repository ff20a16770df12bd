"""Patched runs G_H(x_r, x_c): the fast engine, the brute-force treeified evaluator, activation patching.

Treeified semantics: every input -> output path p carries its own copy of the input, x_r if p is in P and
x_c otherwise. A node's value in the tree depends on the path-suffix sigma from it to the output, and only
through the set A(n, sigma) = {prefixes pi into n : pi + sigma in P}. So we evaluate from the output backward
and memoise on (node, state), where the state is what remains to be matched of P's patterns after reading
sigma backward (for explicit paths: exactly the set of prefixes A(n, sigma)):
  - every prefix into n in P  -> the node's value is the reference cache (no recomputation),
  - no prefix in P            -> the counterfactual cache,
  - otherwise                 -> recompute n from its slots, each sender evaluated in the extended state.
Only "mixed" (node, state) pairs are computed. Tasks of one node, across all hypotheses of a chunk, run as
one call with the copies stacked on the batch axis. The treeified graph (one copy per path, exponential in
depth) is never built; the brute-force evaluator builds it, for tests.
"""

from collections import defaultdict
from functools import lru_cache

import torch

from probegen.errors import ProbegenError
from probegen.patching.graph import slot_sum
from probegen.patching.paths import ANY, item_matches, parse_hypothesis

REF, CF, MIXED = "ref", "cf", "mixed"


class Patcher:
    """Runs the graph once on x_r and once on x_c, caches every node, then evaluates hypotheses."""

    def __init__(self, graph, x_r, x_c):
        self.graph = graph
        self.leaves_r, self.leaves_c = graph.leaf_values(x_r), graph.leaf_values(x_c)
        for leaf in graph.inputs:
            a, b = self.leaves_r[leaf], self.leaves_c[leaf]
            if tuple(a.shape) != tuple(b.shape):
                raise ProbegenError(f"input {leaf!r}: reference shape {tuple(a.shape)} != counterfactual shape "
                                    f"{tuple(b.shape)}")
        with torch.no_grad():
            self.ref = graph.run(leaves=self.leaves_r)  # {node: (B, ...)}
            self.cf = graph.run(leaves=self.leaves_c)
        self.batch = self.ref[graph.output].shape[0]
        self._kind = {}  # (node, state) -> REF | CF | MIXED, shared by all hypotheses
        self._sums = {}  # slot sums of cached values only (no recomputed task among the senders)
        # Nodes fed only by leaves with identical reference and counterfactual values (a constant input, a
        # probe response shared by both models) have one value whatever P says: never recompute them.
        self.static = {leaf for leaf in graph.inputs if torch.equal(self.leaves_r[leaf], self.leaves_c[leaf])}
        for name in graph.order:
            if all(s in self.static for senders in graph.slots(name).values() for s in senders):
                self.static.add(name)

    # -------------------------------------------------------------------------------------- public API

    def outputs(self, hyps, chunk=8):
        """Yield G_H(x_r, x_c) (B, ...) for each hypothesis, in order; `chunk` hypotheses share one pass.
        On CPU ~8 is best (bigger stacks fall out of cache); on a GPU use more."""
        hyps = [parse_hypothesis(self.graph, h) for h in hyps]
        for start in range(0, len(hyps), chunk):
            yield from self._run_chunk(hyps[start:start + chunk])

    def output(self, hyp):
        return next(self.outputs([hyp]))

    def brute_output(self, hyp):
        """G_H by explicit treeification: one copy of the input per path. Exponential; for tests."""
        hyp, g = parse_hypothesis(self.graph, hyp), self.graph

        def value(name, suffix):  # suffix: path elements after `name`, ending at the output
            if g.is_leaf(name):
                path = ((name, None),) + suffix
                return self.leaves_r[name] if hyp.contains(path) else self.leaves_c[name]
            slots = g.slots(name)
            vals = {q: slot_sum(value(s, (_elem(name, q, slots),) + suffix) for s in senders)
                    for q, senders in slots.items()}
            return g.call(name, vals)

        with torch.no_grad():
            return value(g.output, ())

    # ------------------------------------------------------------------------------------------ planning

    def kind(self, name, state):
        """REF if every prefix into `name` completes a path in P, CF if none does, else MIXED."""
        key = (name, state)
        if key not in self._kind:
            self._kind[key] = self._compute_kind(name, state)
        return self._kind[key]

    def _compute_kind(self, name, state):
        inc, exc = state
        if name in self.static:
            return REF  # == CF
        if not inc:
            return CF  # nothing left to match: no prefix can complete a path in P
        if not exc and (ANY,) in inc:
            return REF  # "..." alone matches every prefix
        g = self.graph
        if g.is_leaf(name):
            inc, exc = _step(state, (name, None))
            inside = any(map(_nullable, inc)) and not any(map(_nullable, exc))
            return REF if inside else CF
        kinds = set()
        slots = g.slots(name)
        for q, senders in slots.items():
            sub = _step(state, _elem(name, q, slots))
            kinds.update(self.kind(s, sub) for s in senders if s not in self.static)  # static: REF == CF
            if MIXED in kinds or len(kinds) > 1:
                return MIXED
        return kinds.pop()

    def _plan(self, hyps):
        """Symbolic pass: the mixed (node, state) tasks each hypothesis needs, deduplicated across hypotheses."""
        tasks, by_node = {}, defaultdict(list)

        def request(name, state):
            k = self.kind(name, state)
            if k != MIXED:
                return (k, name)
            key = (name, state)
            if key not in tasks:
                slots = self.graph.slots(name)
                tasks[key] = {q: [request(s, _step(state, _elem(name, q, slots))) for s in senders]
                              for q, senders in slots.items()}
                by_node[name].append(key)
            return ("task", key)

        roots = [request(self.graph.output, _initial_state(h)) for h in hyps]
        return roots, tasks, by_node

    # ----------------------------------------------------------------------------------------- execution

    def _run_chunk(self, hyps):
        roots, tasks, by_node = self._plan(hyps)
        done = {}  # (node, state) -> tensor (B, ...)
        sums = {}  # children -> their slot sum; tasks of many hypotheses share most slot inputs

        def value(ref):
            k, x = ref
            return self.ref[x] if k == REF else self.cf[x] if k == CF else done[x]

        def slot_input(children):
            key = tuple(children)
            cache = sums if any(k == "task" for k, _ in key) else self._sums  # cache-only sums persist
            if key not in cache:
                cache[key] = slot_sum(value(c) for c in children)  # same order as the plain forward: exact
            return cache[key]

        with torch.no_grad():
            for name in self.graph.order:  # senders before receivers, so children are always done
                keys = by_node.get(name)
                if not keys:
                    continue
                # (len(keys) * B, ...) per slot: all patched copies of this node in one call
                slots = {q: torch.cat([slot_input(tasks[k][q]) for k in keys]) for q in tasks[keys[0]]}
                out = self.graph.call(name, slots)
                for k, piece in zip(keys, out.split(self.batch)):
                    done[k] = piece
        return [value(r) for r in roots]


# ----------------------------------------------------------------------------------- backward matching


def _initial_state(hyp):
    return (frozenset(p.items for p in hyp.include), frozenset(p.items for p in hyp.exclude))


def _elem(name, slot, slots):
    """The path element for entering `name` through `slot` (slot dropped on single-slot nodes)."""
    return (name, slot if len(slots) > 1 else None)


def _nullable(residual):
    return all(it == ANY for it in residual)


@lru_cache(maxsize=1 << 20)
def _back(residual, elem):
    """Residual patterns after matching `elem` at the end of `residual` (reading the path backward)."""
    if not residual:
        return frozenset()
    last = residual[-1]
    if last == ANY:  # "..." absorbs elem and stays, or matches nothing and lets the item before it try
        return frozenset({residual}) | _back(residual[:-1], elem)
    return frozenset({residual[:-1]}) if item_matches(last, elem) else frozenset()


@lru_cache(maxsize=1 << 20)
def _step_set(residuals, elem):
    out = frozenset()
    for r in residuals:
        out |= _back(r, elem)
    return out


def _step(state, elem):
    return (_step_set(state[0], elem), _step_set(state[1], elem))


# ------------------------------------------------------------------------------------ activation patching


def activation_patch(graph, x_r, x_c, node):
    """Classic activation patching: run on x_r with `node`'s value replaced by its value on x_c. Reference
    implementation (a plain forward with one override), independent of the path machinery."""
    leaves_r, leaves_c = graph.leaf_values(x_r), graph.leaf_values(x_c)
    with torch.no_grad():
        patched = graph.run(leaves=leaves_c)[node]
        values = dict(leaves_r)
        if node in values:
            values[node] = patched
        for name in graph.order:
            if name == node:
                values[name] = patched
                continue
            slots = {q: slot_sum(values[s] for s in senders) for q, senders in graph.slots(name).items()}
            values[name] = graph.call(name, slots)
    return values[graph.output]

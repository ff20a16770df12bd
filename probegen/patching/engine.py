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

from collections import Counter, defaultdict
from functools import lru_cache

import torch

from probegen.errors import ProbegenError
from probegen.patching.graph import slot_sum, sum_onto
from probegen.patching.paths import ANY, item_matches, parse_hypothesis

REF, CF, MIXED, TASK = "ref", "cf", "mixed", "task"


class Patcher:
    """Runs the graph once on x_r and once on x_c, caches every node, then evaluates hypotheses."""

    def __init__(self, graph, x_r, x_c, exact_sums=None):
        """exact_sums: True: every slot input is the left-to-right sum of its senders' values, bit for bit as in
        the plain forward (sums are only continued from shared prefixes); False: a slot input whose senders
        mostly carry cached values may also be computed as the cached sum plus the differences of the few that
        do not (equal to float rounding). None: the graph's choice (`graph.exact_sums`, True by default)."""
        self.graph = graph
        self.exact_sums = bool(getattr(graph, "exact_sums", True) if exact_sums is None else exact_sums)
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
        self._sums = {}  # exact_sums: slot sums of cached values only (no recomputed task among the senders)
        self._base = {}  # (REF | CF, senders) -> the sum of the senders' reference / counterfactual values
        self._parent = graph.sender_prefixes()
        self.sum_counts = Counter()  # how slot inputs were computed: base, prefix, delta, plain (diagnostics)
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
        tails = _tail_nodes(inc)
        if tails is not None and name not in tails:
            return CF  # no pattern can take a step through `name`: nothing left to match below it
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
                tasks[key] = {}
                for q, senders in slots.items():
                    sub = _step(state, _elem(name, q, slots))  # the same for every sender of the slot
                    tasks[key][q] = [request(s, sub) for s in senders]
                by_node[name].append(key)
            return (TASK, key)

        roots = [request(self.graph.output, _initial_state(h)) for h in hyps]
        return roots, tasks, by_node

    # ----------------------------------------------------------------------------------------- execution

    def _run_chunk(self, hyps):
        roots, tasks, by_node = self._plan(hyps)
        steps = self.graph.steps
        free_after = _last_reads(steps, tasks, roots)
        done = {}  # (node, state) -> tensor (B, ...)
        sums = _SlotSums(self, done)
        with torch.no_grad():
            for i, step in enumerate(steps):  # senders before receivers, so children are always done
                items = [(name, key) for name in step for key in by_node.get(name, ())]
                if not items:
                    continue
                # every patched copy of the step's nodes, computed together (stacked on the batch axis)
                inputs = [(name, {q: sums.get(senders, tasks[key][q]) for q, senders in self.graph.slots(name).items()})
                          for name, key in items]
                for (_, key), out in zip(items, self.graph.call_group(inputs)):
                    done[key] = out
                for key in free_after.get(i, ()):
                    del done[key]  # no later task reads it (slot sums that include it are kept)
        return [sums.value(r) for r in roots]

    def base_sum(self, base, senders):
        """The slot sum of the senders' cached values (base REF or CF), left to right as in the plain forward,
        continued from the sum of the longest sender tuple that is a prefix of `senders`."""
        key = (base, senders)
        if key not in self._base:
            values = self.ref if base == REF else self.cf
            parent = self._parent.get(senders)
            if parent is None:
                total = slot_sum(values[s] for s in senders)
            else:
                total = sum_onto(self.base_sum(base, parent), (values[s] for s in senders[len(parent):]))
            self._base[key] = total
        return self._base[key]


def _last_reads(steps, tasks, roots):
    """{step index: task keys that no task after that step reads} (the roots are read at the end)."""
    step_of = {name: i for i, step in enumerate(steps) for name in step}
    last = {}
    for key, slots in tasks.items():
        i = step_of[key[0]]
        for children in slots.values():
            for kind, x in children:
                if kind == TASK and last.get(x, -1) < i:
                    last[x] = i
    for kind, x in roots:
        if kind == TASK:
            last.pop(x, None)
    out = defaultdict(list)
    for key, i in last.items():
        out[i].append(key)
    return out


class _SlotSums:
    """The slot inputs of one chunk's tasks. A slot input is the sum of its children's values, where a child is
    (REF | CF, node) for a cached value or (TASK, key) for a recomputed one. Each distinct child list is summed
    once (the heads of a layer, and their q / k / v slots, mostly read the same list), by the cheapest of:

    prefix   continue the sum of the longest prefix already summed: a list summed in this chunk, or the cached
             REF / CF sum of an earlier slot's senders while the children are still all REF / all CF there.
             Left to right, in place: bit-identical to slot_sum of the children.
    delta    (only without exact_sums) the cached REF or CF sum of all the senders plus (value - cached value)
             of the children that differ from it: 2 operations per differing child instead of one per sender
             after the prefix. Equal to the plain sum up to float rounding.
    """

    def __init__(self, patcher, done):
        self.p, self.done, self.chunk = patcher, done, {}

    def value(self, child):
        kind, x = child
        return self.p.ref[x] if kind == REF else self.p.cf[x] if kind == CF else self.done[x]

    def get(self, senders, children):
        key = tuple(children)
        total = self._lookup(key)
        if total is None:
            total = self._compute(senders, key)
            if self.p.exact_sums and all(k != TASK for k, _ in key):
                self.p._sums[key] = total  # cached values only: valid for every later chunk too
            else:
                self.chunk[key] = total
        return total

    def _lookup(self, key):
        total = self.chunk.get(key)
        return total if total is not None else self.p._sums.get(key)

    def _compute(self, senders, key):
        changed = {base: self._differing(key, base) for base in (REF, CF)}
        base = min(changed, key=lambda b: len(changed[b]))
        counts = self.p.sum_counts
        if not changed[base]:
            counts["base"] += 1
            return self.p.base_sum(base, senders)
        start, total = self._prefix(senders, key, changed)
        if not self.p.exact_sums and 2 * len(changed[base]) < len(key) - max(start, 1):
            counts["delta"] += 1
            values = self.p.ref if base == REF else self.p.cf
            return sum_onto(self.p.base_sum(base, senders),
                            (self.value(key[i]) - values[senders[i]] for i in changed[base]))
        rest = (self.value(c) for c in key[start:])
        counts["plain" if total is None else "prefix"] += 1
        return slot_sum(rest) if total is None else sum_onto(total, rest)

    def _differing(self, key, base):
        """Indices of the children whose value is not the `base` cache's (constant nodes are in both)."""
        static = self.p.static
        return [i for i, (k, x) in enumerate(key) if k != base and not (k == REF and x in static)]

    def _prefix(self, senders, key, changed):
        """(k, sum of the first k children) for the longest usable prefix, or (0, None)."""
        parent = self.p._parent.get(senders)
        while parent is not None:
            k = len(parent)
            total = self._lookup(key[:k])
            if total is not None:
                return k, total
            for base, idx in changed.items():
                if not idx or idx[0] >= k:  # the first k children are all `base`: its cached sum is theirs
                    return k, self.p.base_sum(base, parent)
            parent = self.p._parent.get(parent)
        return 0, None


# ----------------------------------------------------------------------------------- backward matching


def _initial_state(hyp):
    return (frozenset(p.items for p in hyp.include), frozenset(p.items for p in hyp.exclude))


def _elem(name, slot, slots):
    """The path element for entering `name` through `slot` (slot dropped on single-slot nodes)."""
    return (name, slot if len(slots) > 1 else None)


@lru_cache(maxsize=1 << 16)
def _tail_nodes(residuals):
    """The nodes the residual patterns can match next (their last items), or None when one ends in "..."."""
    tails = set()
    for r in residuals:
        if r and r[-1] == ANY:
            return None
        if r:
            tails.add(r[-1][0])
    return frozenset(tails)


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

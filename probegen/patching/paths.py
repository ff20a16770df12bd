"""Paths and hypotheses as readable values.

A path runs from an input leaf through nodes (entering each by a named slot) to the output:

    "emb -> 0.0.v -> 1.1.k -> out"        a concrete path: every multi-slot node names its slot
    "emb -> 0.0 -> 1.1.k -> out"          a pattern: no slot on 0.0 means any of its slots
    "... -> 1.1 -> ..."                   "..." matches any chain of zero or more nodes

A path is a tuple of items; an item is (node, slot) with slot None for leaves, single-slot nodes and
"any slot", or ANY ("..."). A pattern stands for the set of concrete paths it matches.

A hypothesis P is a set of paths: the union of its `include` patterns minus the union of its `exclude`
patterns, printed and parsed as "{p1, p2}" or "{p1, p2} - {p3}":

    "{}"                                  empty: every path gets the counterfactual input
    "{...}"                               every path gets the reference input
    "{...} - {... -> 0.0 -> ...}"         activation patching of node 0.0
"""

from dataclasses import dataclass
from functools import lru_cache

from probegen.errors import ProbegenError

ANY = "..."


@dataclass(frozen=True)
class Path:
    items: tuple  # ((node, slot|None) | ANY, ...)

    def __str__(self):
        return " -> ".join(ANY if it == ANY else (f"{it[0]}.{it[1]}" if it[1] is not None else it[0])
                           for it in self.items)

    __repr__ = lambda self: f"Path({str(self)!r})"

    @property
    def concrete(self):
        return ANY not in self.items

    def matches(self, path):
        """Does this pattern match the concrete path `path` (a Path or a tuple of items)?"""
        return _match(self.items, path.items if isinstance(path, Path) else tuple(path))


@dataclass(frozen=True, eq=False)
class Hypothesis:
    include: tuple  # (Path, ...)
    exclude: tuple = ()

    def __str__(self):
        inc = "{" + ", ".join(map(str, self.include)) + "}"
        return inc + (" - {" + ", ".join(map(str, self.exclude)) + "}" if self.exclude else "")

    __repr__ = lambda self: f"Hypothesis({str(self)!r})"

    def __eq__(self, other):
        return (isinstance(other, Hypothesis) and set(self.include) == set(other.include)
                and set(self.exclude) == set(other.exclude))

    def __hash__(self):
        return hash((frozenset(self.include), frozenset(self.exclude)))

    def contains(self, path):
        """Is the concrete path in P? (Direct pattern matching; the brute-force evaluator uses this.)"""
        return any(p.matches(path) for p in self.include) and not any(p.matches(path) for p in self.exclude)

    def union(self, *paths):
        """P plus the given paths (added to `include`; an excluded path stays excluded)."""
        new = [p for p in paths if p not in self.include]
        return Hypothesis(self.include + tuple(new), self.exclude)


@lru_cache(maxsize=None)
def _match(items, elems):
    if not items:
        return not elems
    head, rest = items[0], items[1:]
    if head == ANY:
        return _match(rest, elems) or (bool(elems) and _match(items, elems[1:]))
    return bool(elems) and item_matches(head, elems[0]) and _match(rest, elems[1:])


def item_matches(item, elem):
    """A pattern item (node, slot|None) matches a path element (node, slot)."""
    return item[0] == elem[0] and (item[1] is None or item[1] == elem[1])


# -------------------------------------------------------------------------------------------------- parsing


def parse_path(graph, text):
    """'emb -> 0.0 -> 1.1.k -> out' -> Path, checked against the graph (names, slots, edges, ends)."""
    if isinstance(text, Path):
        return check_path(graph, text)
    tokens = [t.strip() for t in str(text).split("->")]
    items = []
    for tok in tokens:
        item = _parse_item(graph, tok, text)
        if not (item == ANY and items and items[-1] == ANY):  # "... -> ..." is one "..."
            items.append(item)
    return check_path(graph, Path(tuple(items)))


def _parse_item(graph, tok, text):
    if tok == ANY:
        return ANY
    if not tok:
        raise ProbegenError(f"path {text!r}: empty node name")
    if graph.has(tok):
        return (tok, None)
    node, _, slot = tok.rpartition(".")
    if node and graph.has(node):
        slots = graph.slots(node)
        if graph.is_leaf(node):
            raise ProbegenError(f"path {text!r}: input {node!r} has no slots (got {tok!r})")
        if slot not in slots:
            raise ProbegenError(f"path {text!r}: node {node!r} has no slot {slot!r} (slots: {', '.join(slots)})")
        return (node, None if len(slots) == 1 else slot)
    raise ProbegenError(f"path {text!r}: unknown node {tok!r}")


def check_path(graph, path):
    """Raise a ProbegenError unless `path` can match some input -> output path of the graph."""
    items, text = path.items, str(path)
    if not items:
        raise ProbegenError("path '': empty")
    for it in items:
        if it != ANY and (not graph.has(it[0]) or (it[1] is not None and it[1] not in graph.slots(it[0]))):
            raise ProbegenError(f"path {text!r}: unknown node or slot {it}")
    # canonical form: no slot on single-slot nodes, so "out" and "out.resid" are the same path
    items = tuple(it if it == ANY or len(graph.slots(it[0])) > 1 else (it[0], None) for it in items)
    if items[0] != ANY and not graph.is_leaf(items[0][0]):
        raise ProbegenError(f"path {text!r}: does not start at an input (inputs: {', '.join(graph.inputs)})")
    if items[-1] != ANY and items[-1][0] != graph.output:
        raise ProbegenError(f"path {text!r}: does not reach the output {graph.output!r}")
    fixed = [(i, it) for i, it in enumerate(items) if it != ANY]
    for (i, a), (j, b) in zip(fixed, fixed[1:]):
        if j == i + 1:  # adjacent: must be an edge a -> b.slot
            slots = [b[1]] if b[1] is not None else list(graph.slots(b[0]))
            if not any(a[0] in graph.slots(b[0])[q] for q in slots):
                into = f"{b[0]}.{b[1]}" if b[1] is not None else b[0]
                raise ProbegenError(f"path {text!r}: no edge {a[0]} -> {into} in the graph")
        elif a[0] == b[0] or not graph.reaches(a[0], b[0]):  # "a -> ... -> b": b must be downstream of a
            raise ProbegenError(f"path {text!r}: {b[0]} is not downstream of {a[0]}")
    return Path(items)


def parse_hypothesis(graph, text):
    """'{p1, p2} - {p3}' -> Hypothesis. A Hypothesis passes through (checked); a list of paths is an include set."""
    if isinstance(text, Hypothesis):
        return Hypothesis(tuple(parse_path(graph, p) for p in text.include),
                          tuple(parse_path(graph, p) for p in text.exclude))
    if isinstance(text, (list, tuple, set, frozenset)):
        return Hypothesis(_dedupe(parse_path(graph, p) for p in text))
    s = str(text).strip()
    inc, exc = _split_sets(s)
    return Hypothesis(_dedupe(parse_path(graph, p) for p in inc), _dedupe(parse_path(graph, p) for p in exc))


def _split_sets(s):
    if not s.startswith("{") or "}" not in s:
        raise ProbegenError(f"hypothesis {s!r}: expected '{{path, ...}}' or '{{...}} - {{...}}'")
    close = s.index("}")
    inc, rest = s[1:close], s[close + 1:].strip()
    exc = ""
    if rest:
        if not (rest.startswith("-") and rest[1:].strip().startswith("{") and rest.endswith("}")):
            raise ProbegenError(f"hypothesis {s!r}: expected '{{...}} - {{...}}' after the first set")
        exc = rest[1:].strip()[1:-1]
    if "{" in inc or "{" in exc or "}" in exc:
        raise ProbegenError(f"hypothesis {s!r}: unbalanced braces")
    split = lambda body: [p.strip() for p in body.split(",") if p.strip()]
    return split(inc), split(exc)


def _dedupe(paths):
    out = []
    for p in paths:
        if p not in out:
            out.append(p)
    return tuple(out)


# ------------------------------------------------------------------------------------------ constructors


def all_paths(graph):
    """Every concrete input -> output path, in a deterministic order. Exponential in depth: small graphs only."""
    out = []

    def walk(name, suffix):
        if graph.is_leaf(name):
            out.append(Path(((name, None),) + suffix))
            return
        slots = graph.slots(name)
        for q, senders in slots.items():
            elem = (name, q if len(slots) > 1 else None)
            for s in senders:
                walk(s, (elem,) + suffix)

    walk(graph.output, ())
    return out


def paths_through(graph, node):
    """Pattern of every path through `node` (through its slot when given as 'node.slot')."""
    return parse_path(graph, f"{ANY} -> {node} -> {ANY}")


def node_patch(graph, node):
    """Activation patching of `node` as a hypothesis: every path except those through it."""
    return Hypothesis((Path((ANY,)),), (paths_through(graph, node),))


def edge_patch(graph, sender, receiver):
    """Sender -> receiver path patching ('0.0', '1.1.k'): every path except those using that edge."""
    return Hypothesis((Path((ANY,)),), (parse_path(graph, f"{ANY} -> {sender} -> {receiver} -> {ANY}"),))


EVERYTHING = Hypothesis((Path((ANY,)),))
NOTHING = Hypothesis(())

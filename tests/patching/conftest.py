"""Hand-built graphs for the path-patching tests."""

import pytest
import torch

from probegen.patching import Graph, Node


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: thread synchronisation costs more than it saves (and keeps results deterministic).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def random_dag(seed, leaves=("a", "b"), n_nodes=5, width=3, linear=False, max_slots=3):
    """A random DAG over float64 vectors (B, width): every node has 1..max_slots slots, each fed by 1..3
    random earlier nodes; node functions mix their slots non-linearly (unless linear=True), so a wrong slot
    or a wrong copy of an input changes the output. The last node is the output and reads every node."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    randint = lambda n: int(torch.randint(0, n, (1,), generator=gen))
    names, nodes = list(leaves), []
    for i in range(n_nodes):
        name = f"n{i}"
        slots = {}
        for q in range(1 + randint(max_slots)):
            k = 1 + randint(min(3, len(names)))
            perm = torch.randperm(len(names), generator=gen)[:k].tolist()
            slots[f"s{q}"] = tuple(names[j] for j in perm)
        nodes.append(Node(name, _node_fn(list(slots), rand, width, linear), slots))
        names.append(name)
    out_slots = {"x": tuple(names[len(leaves):]), "y": tuple(leaves)}
    nodes.append(Node("out", _node_fn(["x", "y"], rand, width, linear), out_slots))
    return Graph(list(leaves), nodes, "out")


def _node_fn(slots, rand, width, linear):
    W = {q: rand(width, width) / width ** 0.5 for q in slots}
    M = rand(width, width) / width ** 0.5

    def fn(**vals):
        h = sum(vals[q] @ W[q] for q in slots)
        if linear:
            return h
        # a product of the first and last slot: treeified copies entering different slots must differ
        return torch.tanh(h) + 0.5 * (vals[slots[0]] @ M) * torch.sin(vals[slots[-1]])
    return fn


def random_inputs(graph, batch, seed, width=3):
    gen = torch.Generator().manual_seed(seed)
    return {leaf: torch.randn(batch, width, generator=gen, dtype=torch.float64) for leaf in graph.inputs}


@pytest.fixture
def dag():
    return random_dag


@pytest.fixture
def inputs():
    return random_inputs

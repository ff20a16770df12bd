"""The engine's slot-sum shortcuts: in-place accumulation, sums continued from shared prefixes (bit-identical
to the plain left-to-right sum), and cached sums plus differences (exact_sums=False: equal to rounding)."""

import random

import pytest
import torch

from probegen.patching import Graph, Hypothesis, Node, Patcher, activation_patch, all_paths, edge_patch, node_patch
from probegen.patching.graph import slot_sum, sum_onto


def plain_sum(values):
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def test_in_place_accumulation_is_bit_identical_and_leaves_its_inputs_alone():
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(5, 7, generator=gen) * 10 ** k for k in range(-3, 4)]
    copies = [v.clone() for v in values]
    assert torch.equal(slot_sum(values), plain_sum(values))
    start = values[0]
    assert torch.equal(sum_onto(start, values[1:]), plain_sum(values))
    assert all(torch.equal(v, c) for v, c in zip(values, copies))  # the first term was not accumulated into
    assert sum_onto(start, []) is start and slot_sum([start]) is start


def test_terms_that_broadcast_or_promote_are_added_out_of_place():
    row, full = torch.ones(1, 3), torch.arange(6.0).view(2, 3)
    assert torch.equal(slot_sum([row, row, full]), row + row + full)  # (1, 3) + (1, 3) cannot hold (2, 3)
    double = torch.ones(2, 3, dtype=torch.float64)
    out = slot_sum([full, full, double])
    assert out.dtype == torch.float64 and torch.equal(out, full + full + double)


def residual_graph(seed, layers=3, heads=3, width=4):
    """A random residual stream: per layer `heads` nodes with slots q and k reading everything written so far,
    then an MLP reading the same plus that layer's heads; the output reads the whole stream. Sender lists of
    later slots extend earlier ones, as in a transformer."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64) / width ** 0.5
    stream, nodes = ["tok", "pos"], []

    def head_fn(Wq, Wk):
        return lambda q, k: torch.tanh(q @ Wq) * torch.sin(k @ Wk) + 0.1 * q

    for layer in range(layers):
        written = []
        for h in range(heads):
            name = f"{layer}.{h}"
            nodes.append(Node(name, head_fn(rand(width, width), rand(width, width)),
                              {"q": tuple(stream), "k": tuple(stream)}))
            written.append(name)
        stream += written
        W = rand(width, width)
        nodes.append(Node(f"mlp{layer}", lambda x, W=W: torch.relu(x @ W) - 0.3 * x, {"x": tuple(stream)}))
        stream.append(f"mlp{layer}")
    W_out = rand(width, 2)
    nodes.append(Node("out", lambda x: torch.tanh(x) @ W_out, {"x": tuple(stream)}))
    return Graph(["tok", "pos"], nodes, "out")


def pairs(graph, batch=3, seed=0, width=4):
    gen = torch.Generator().manual_seed(seed)
    make = lambda: {leaf: torch.randn(batch, width, generator=gen, dtype=torch.float64) for leaf in graph.inputs}
    return make(), make()


def test_sender_prefixes_find_the_longest_earlier_sender_list():
    g = residual_graph(0, layers=2, heads=2)
    parents = g.sender_prefixes()
    first, mlp0, second = g.slots("0.0")["q"], g.slots("mlp0")["x"], g.slots("1.0")["q"]
    assert parents[first] is None
    assert parents[mlp0] == first and parents[second] == mlp0 and parents[g.slots("out")["x"]] == g.slots("mlp1")["x"]


def test_prefix_continued_sums_keep_the_engine_bit_identical_to_activation_patching():
    g = residual_graph(1)
    x_r, x_c = pairs(g)
    p = Patcher(g, x_r, x_c)
    assert p.exact_sums  # a plain Graph: exact left-to-right sums
    for node in g.order:
        assert torch.equal(p.output(node_patch(g, node)), activation_patch(g, x_r, x_c, node)), node
    assert p.sum_counts["prefix"] > 0 and p.sum_counts["delta"] == 0  # the shortcut was taken, exactly


def manual_edge_patch(g, x_r, x_c, sender, receiver, slot):
    ref, cf = g.run(x_r), g.run(x_c)
    values = dict(ref)
    for name in g.order:
        slots = {q: plain_sum([cf[s] if (s, name, q) == (sender, receiver, slot) else values[s] for s in senders])
                 for q, senders in g.slots(name).items()}
        values[name] = g.call(name, slots)
    return values[g.output]


@pytest.mark.parametrize("exact", [True, False])
def test_edge_patches_on_a_residual_stream(exact):
    g = residual_graph(2)
    x_r, x_c = pairs(g, seed=1)
    p = Patcher(g, x_r, x_c, exact_sums=exact)
    for receiver, slot in [("0.1", "k"), ("1.2", "q"), ("mlp1", "x"), ("2.0", "q"), ("out", "x")]:
        for sender in g.slots(receiver)[slot][::3]:
            name = receiver if len(g.slots(receiver)) == 1 else f"{receiver}.{slot}"
            out, want = p.output(edge_patch(g, sender, name)), manual_edge_patch(g, x_r, x_c, sender, receiver, slot)
            if exact:
                assert torch.equal(out, want), (sender, receiver, slot)
            else:
                torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    if not exact:
        assert p.sum_counts["delta"] > 0  # one sender changed among many: cached sum + its difference


def test_cached_sums_plus_differences_equal_brute_force_on_random_graphs(dag, inputs):
    rng = random.Random(0)
    # small residual streams: the brute-force evaluator treeifies the graph (exponential in depth)
    graphs = [residual_graph(seed, layers=2, heads=2) for seed in range(3)] + [dag(seed, n_nodes=6) for seed in range(3)]
    used = 0
    for i, g in enumerate(graphs):
        x_r, x_c = (pairs(g, seed=i) if "tok" in g.inputs else (inputs(g, 4, i), inputs(g, 4, i + 20)))
        fast, exact = Patcher(g, x_r, x_c, exact_sums=False), Patcher(g, x_r, x_c, exact_sums=True)
        paths = all_paths(g)
        hyps = [Hypothesis(tuple(rng.sample(paths, k))) for k in (1, 2, 5, 20, len(paths) // 2)]
        hyps += [node_patch(g, rng.choice(g.order)) for _ in range(3)]
        for h, a, b in zip(hyps, fast.outputs(hyps, chunk=3), exact.outputs(hyps, chunk=3)):
            brute = exact.brute_output(h)
            torch.testing.assert_close(a, brute, rtol=0, atol=1e-12, msg=str(h))
            torch.testing.assert_close(b, brute, rtol=0, atol=1e-12, msg=str(h))
        used += fast.sum_counts["delta"]
    assert used > 0


def test_freed_intermediate_values_do_not_change_results():
    # tasks read only by earlier steps are dropped during a chunk; every hypothesis of a chunk still gets its
    # own value, whichever others share the chunk
    g = residual_graph(4)
    x_r, x_c = pairs(g, seed=3)
    p = Patcher(g, x_r, x_c)
    rng = random.Random(4)
    paths = all_paths(g)
    hyps = [Hypothesis(tuple(rng.sample(paths, k))) for k in (3, 30, 300)] + [node_patch(g, "1.1")]
    together = list(p.outputs(hyps, chunk=len(hyps)))
    for h, out in zip(hyps, together):
        assert torch.equal(out, p.output(h))

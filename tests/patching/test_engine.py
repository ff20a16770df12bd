"""The fast engine against ground truths: hand-built graphs, brute-force treeification, activation patching."""

import random

import torch

from probegen.patching import (EVERYTHING, NOTHING, Graph, Hypothesis, Node, Patcher, activation_patch, all_paths,
                               edge_patch, evaluate, node_patch, parse_hypothesis, squared_error)
from probegen.patching.graph import slot_sum
from probegen.patching.transformer import AttnOnlyTransformer, TransformerConfig


def test_everything_is_reference_nothing_is_counterfactual(dag, inputs):
    for seed in range(3):
        g = dag(seed)
        x_r, x_c = inputs(g, 5, 100 + seed), inputs(g, 5, 200 + seed)
        p = Patcher(g, x_r, x_c)
        assert torch.equal(p.output(EVERYTHING), g(x_r))
        assert torch.equal(p.output(NOTHING), g(x_c))
        assert not torch.allclose(g(x_r), g(x_c))


def square_graph():
    # y = h * h with h = x: two edges h -> y (slots a and b), so two paths
    return Graph(["x"], [Node("h", lambda v: v, {"v": ("x",)}),
                         Node("y", lambda a, b: a * b, {"a": ("h",), "b": ("h",)})], "y")


def test_square_patching_one_edge_gives_x_r_times_x_c():
    g = square_graph()
    x_r, x_c = torch.tensor([[2.0], [3.0]]), torch.tensor([[5.0], [7.0]])
    p = Patcher(g, x_r, x_c)
    assert torch.equal(p.output("{x -> h -> y.a}"), x_r * x_c)
    assert torch.equal(p.output("{x -> h -> y.b}"), x_c * x_r)
    assert torch.equal(p.output(edge_patch(g, "h", "y.b")), x_r * x_c)  # sender -> receiver patching
    # node (activation) patching cannot separate the two uses of h: x_r^2 or x_c^2 only
    for node in ("x", "h", "y"):
        out = activation_patch(g, x_r, x_c, node)
        assert not torch.equal(out, x_r * x_c)
        assert torch.equal(out, x_c * x_c)
        assert torch.equal(p.output(node_patch(g, node)), out)


def test_path_through_a_zero_weight_branch_explains_nothing():
    g = Graph(["x"], [Node("dead", lambda v: 0.0 * v, {"v": ("x",)}),
                      Node("live", lambda v: torch.tanh(3 * v), {"v": ("x",)}),
                      Node("out", lambda s: s, {"s": ("dead", "live")})], "out")
    gen = torch.Generator().manual_seed(0)
    x_r, x_c = torch.randn(64, 4, generator=gen), torch.randn(64, 4, generator=gen)
    dead, live, both = evaluate(g, ["{x -> dead -> out}", "{x -> live -> out}", "{...}"], x_r, x_c,
                                metric=squared_error(), n_boot=200)
    assert dead["explained"] == 0.0 and dead["aue"] == dead["ate"] > 0
    assert live["explained"] == 1.0 and both["explained"] == 1.0
    assert dead["explained_ci"] == [0.0, 0.0]


def test_effects_add_over_disjoint_path_sets_in_a_linear_network(dag, inputs):
    g = dag(7, n_nodes=6, linear=True)
    x_r, x_c = inputs(g, 4, 1), inputs(g, 4, 2)
    p = Patcher(g, x_r, x_c)
    paths = all_paths(g)
    rng = random.Random(0)
    base = g(x_c)
    for _ in range(5):
        chosen = rng.sample(paths, 8)
        p1, p2 = Hypothesis(tuple(chosen[:4])), Hypothesis(tuple(chosen[4:]))
        effect = lambda h: p.output(h) - base
        torch.testing.assert_close(effect(p1.union(*p2.include)), effect(p1) + effect(p2), rtol=0, atol=1e-12)
    # and the per-path effects sum to the total effect
    total = sum(p.output(Hypothesis((q,))) - base for q in paths)
    torch.testing.assert_close(total, g(x_r) - base, rtol=0, atol=1e-12)


def test_complement_of_a_node_is_activation_patching(dag, inputs):
    for seed in range(3):
        g = dag(seed, n_nodes=6)
        x_r, x_c = inputs(g, 5, seed), inputs(g, 5, seed + 50)
        p = Patcher(g, x_r, x_c)
        for node in g.inputs + g.order:
            assert torch.equal(p.output(node_patch(g, node)), activation_patch(g, x_r, x_c, node)), node


def tiny_transformer_patcher(seed, batch):
    """A random 2-layer, 2-head attention-only transformer (float64) and a Patcher on random token pairs."""
    torch.manual_seed(seed)
    model = AttnOnlyTransformer(TransformerConfig(vocab=10, seq_len=8, d_model=16, n_heads=2, d_head=8)).double()
    g = model.patch_graph()
    x_r, x_c = torch.randint(0, 10, (batch, 8)), torch.randint(0, 10, (batch, 8))
    return g, x_r, x_c, Patcher(g, x_r, x_c)


def test_complement_of_a_head_is_activation_patching_in_a_transformer():
    g, x_r, x_c, p = tiny_transformer_patcher(seed=0, batch=6)
    for node in ["emb", "0.0", "0.1", "1.0", "1.1", "out"]:
        assert torch.equal(p.output(node_patch(g, node)), activation_patch(g, x_r, x_c, node)), node


def manual_edge_patch(g, x_r, x_c, sender, receiver, slot):
    """Sender -> receiver path patching done by hand: receiver's slot gets the sender's counterfactual value."""
    ref, cf = g.run(x_r), g.run(x_c)
    values = dict(ref)
    for name in g.order:
        slots = {q: slot_sum(cf[s] if (s, name, q) == (sender, receiver, slot) else values[s] for s in senders)
                 for q, senders in g.slots(name).items()}
        values[name] = g.call(name, slots)
    return values[g.output]


def test_edge_patching_is_a_special_case(dag, inputs):
    g = dag(3, n_nodes=6)
    x_r, x_c = inputs(g, 5, 1), inputs(g, 5, 2)
    p = Patcher(g, x_r, x_c)
    for receiver in g.order:
        for slot, senders in g.slots(receiver).items():
            for sender in senders:
                hyp = edge_patch(g, sender, f"{receiver}.{slot}" if len(g.slots(receiver)) > 1 else receiver)
                torch.testing.assert_close(p.output(hyp), manual_edge_patch(g, x_r, x_c, sender, receiver, slot),
                                           rtol=0, atol=1e-12)


def random_hypotheses(g, rng, n):
    """Random explicit path sets of varied density, and random patterns with exclusions."""
    paths, nodes = all_paths(g), g.inputs + g.order
    hyps = []
    for i in range(n):
        if i % 3 < 2:
            density = rng.choice([0.05, 0.3, 0.7, 0.95])
            hyps.append(Hypothesis(tuple(q for q in paths if rng.random() < density)))
        else:
            inc = [f"... -> {rng.choice(nodes)} -> ...", rng.choice(["a -> ...", "... -> n2 -> ...", "b -> ..."])]
            exc = [f"... -> {rng.choice(g.order)} -> ..."]
            hyps.append(parse_hypothesis(g, "{" + ", ".join(inc) + "} - {" + ", ".join(exc) + "}"))
    # same include set, different exclusions, in one batch: their tasks must not be confused
    return hyps + [node_patch(g, m) for m in g.order]


def test_fast_engine_equals_brute_force_treeification(dag, inputs):
    rng = random.Random(0)
    for seed in range(4):
        g = dag(seed, n_nodes=5)
        x_r, x_c = inputs(g, 4, seed), inputs(g, 4, seed + 10)
        p = Patcher(g, x_r, x_c)
        hyps = random_hypotheses(g, rng, 15)
        batched = list(p.outputs(hyps, chunk=8))  # many hypotheses per pass, on the batch axis
        for h, out in zip(hyps, batched):
            brute = p.brute_output(h)
            torch.testing.assert_close(out, brute, rtol=0, atol=1e-12, msg=str(h))
            assert torch.equal(out, p.output(h))  # batching changes nothing


def test_fast_engine_equals_brute_force_on_a_transformer():
    g, _, _, p = tiny_transformer_patcher(seed=1, batch=3)
    paths, rng = all_paths(g), random.Random(1)
    hyps = [Hypothesis(tuple(rng.sample(paths, k))) for k in (1, 3, 10, 25, 45)]
    for h, out in zip(hyps, p.outputs(hyps)):
        torch.testing.assert_close(out, p.brute_output(h), rtol=0, atol=1e-12)


def test_per_probe_leaves_subset_hypothesis():
    # Several input tensors (e.g. one response per probe) feeding a classifier through separate slots:
    # the paths from a subset S of leaves get the reference, the others the counterfactual.
    K = 4
    gen = torch.Generator().manual_seed(0)
    W1, W2 = torch.randn(K * 3, 8, generator=gen), torch.randn(8, 2, generator=gen)
    cls = lambda **r: torch.relu(torch.cat([r[f"r{k}"] for k in range(K)], -1) @ W1) @ W2
    g = Graph([f"p{k}" for k in range(K)],
              [Node("cls", cls, {f"r{k}": (f"p{k}",) for k in range(K)})], "cls")
    x_r = {f"p{k}": torch.randn(5, 3, generator=gen) for k in range(K)}
    x_c = {f"p{k}": torch.randn(5, 3, generator=gen) for k in range(K)}
    S = [0, 2]
    out = Patcher(g, x_r, x_c).output("{" + ", ".join(f"p{k} -> ..." for k in S) + "}")
    mixed = {f"p{k}": (x_r if k in S else x_c)[f"p{k}"] for k in range(K)}
    assert torch.equal(out, g(mixed))


def test_nodes_fed_only_by_identical_inputs_are_never_recomputed():
    calls = []

    def counted(name, fn):
        def wrapped(**v):
            calls.append(name)
            return fn(**v)
        return wrapped

    g = Graph(["x", "pos"], [Node("p", counted("p", lambda v: torch.sin(v)), {"v": ("pos",)}),
                             Node("h", counted("h", lambda a, b: a * b), {"a": ("x",), "b": ("p",)}),
                             Node("out", counted("out", lambda v: v.sum(-1)), {"v": ("h", "p")})], "out")
    x_r, x_c, pos = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    p = Patcher(g, {"x": x_r, "pos": pos}, {"x": x_c, "pos": pos})
    assert p.static == {"pos", "p"}
    calls.clear()
    out = p.output("{pos -> p -> out, x -> h -> out}")  # every path that matters is in P
    assert torch.equal(out, p.ref["out"]) and calls == []
    out = p.output("{pos -> p -> out, pos -> p -> h -> out}")  # only constant paths: same as G(x_c)
    assert torch.equal(out, p.cf["out"]) and calls == []
    assert torch.equal(p.output("{pos -> ...}"), p.brute_output("{pos -> ...}"))

"""Paths and hypotheses as strings; graph declaration checks; torch.fx import; one-line errors."""

import pytest
import torch
import torch.nn as nn

from probegen.errors import ProbegenError
from probegen.patching import (Graph, Node, Patcher, activation_patch, all_paths, graph_from_fx, node_patch,
                               parse_hypothesis, parse_path)
from probegen.patching.transformer import AttnOnlyTransformer, TransformerConfig


@pytest.fixture(scope="module")
def tgraph():
    return AttnOnlyTransformer(TransformerConfig(vocab=8, seq_len=6, d_model=8, n_heads=2, d_head=4)).patch_graph()


def test_round_trip_and_canonical_form(tgraph):
    p = parse_path(tgraph, "emb -> 0.0.v -> 1.1.k -> out.resid")
    assert str(p) == "emb -> 0.0.v -> 1.1.k -> out"  # single-slot node printed without its slot
    assert parse_path(tgraph, str(p)) == p
    text = "{emb -> 1.1.q -> out, emb -> 0.0 -> 1.1.k -> out} - {... -> 0.1 -> ...}"
    h = parse_hypothesis(tgraph, text)
    assert str(h) == text and parse_hypothesis(tgraph, str(h)) == h
    assert str(parse_hypothesis(tgraph, "{}")) == "{}"
    assert str(node_patch(tgraph, "0.1")) == "{...} - {... -> 0.1 -> ...}"


def test_patterns_expand_to_the_right_concrete_paths(tgraph):
    paths = all_paths(tgraph)
    assert len(paths) == tgraph.count_paths() == 1 + 2 * 3 + 2 * 3 + 2 * 3 * 2 * 3  # 49
    assert len(set(paths)) == len(paths) and all(p.concrete for p in paths)
    h = parse_hypothesis(tgraph, "{emb -> 0.0 -> 1.1.k -> out}")  # 0.0 without a slot: q, k or v
    assert sorted(str(p) for p in paths if h.contains(p)) == [
        f"emb -> 0.0.{s} -> 1.1.k -> out" for s in ("k", "q", "v")]
    through = parse_hypothesis(tgraph, "{... -> 1.1 -> ...}")
    assert sum(through.contains(p) for p in paths) == 3 + 3 * 2 * 3  # direct + via any layer-0 head
    everything_but = parse_hypothesis(tgraph, "{...} - {... -> 1.1 -> ...}")
    assert sum(everything_but.contains(p) for p in paths) == 49 - 21


@pytest.mark.parametrize("text, message", [
    ("emb -> 9.9 -> out", "unknown node '9.9'"),
    ("emb -> 1.1.z -> out", "node '1.1' has no slot 'z' (slots: q, k, v)"),
    ("emb.q -> out", "input 'emb' has no slots"),
    ("emb -> 0.0 -> 1.1.k", "does not reach the output 'out'"),
    ("0.0 -> 1.1.k -> out", "does not start at an input"),
    ("emb -> 1.1 -> 0.0 -> out", "no edge 1.1 -> 0.0"),
    ("emb -> 0.0 -> 0.1 -> out", "no edge 0.0 -> 0.1"),
    ("emb -> 1.0 -> ... -> 0.0 -> out", "0.0 is not downstream of 1.0"),
    ("emb ->  -> out", "empty node name"),
])
def test_bad_paths_raise_one_clear_line(tgraph, text, message):
    with pytest.raises(ProbegenError) as err:
        parse_path(tgraph, text)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["emb -> out", "{emb -> out", "{emb -> out} + {emb -> out}", "{a}{b}"])
def test_bad_hypothesis_syntax(tgraph, text):
    with pytest.raises(ProbegenError, match="hypothesis|unknown node"):
        parse_hypothesis(tgraph, text)


def test_graph_declaration_errors():
    ident = lambda x: x
    with pytest.raises(ProbegenError, match="unknown sender 'nope'"):
        Graph(["x"], [Node("out", ident, {"x": ("nope",)})], "out")
    with pytest.raises(ProbegenError, match="cycle"):
        Graph(["x"], [Node("a", ident, {"x": ("b",)}), Node("b", ident, {"x": ("a",)}),
                      Node("out", ident, {"x": ("a",)})], "out")
    with pytest.raises(ProbegenError, match="output 'y'"):
        Graph(["x"], [Node("out", ident, {"x": ("x",)})], "y")
    with pytest.raises(ProbegenError, match="graph node name"):
        Graph(["x"], [Node("a,b", ident, {"x": ("x",)})], "a,b")
    g = Graph(["x"], [Node("out", lambda x: (x, x), {"x": ("x",)})], "out")
    with pytest.raises(ProbegenError, match="returned tuple"):
        g(torch.zeros(2, 3))


def test_mismatched_shapes_between_reference_and_counterfactual(tgraph):
    with pytest.raises(ProbegenError, match=r"input 'emb': reference shape \(4, 6, 8\) != counterfactual shape \(3, 6, 8\)"):
        Patcher(tgraph, torch.zeros(4, 6, dtype=torch.long), torch.zeros(3, 6, dtype=torch.long))


def test_missing_leaf_value(dag):
    g = dag(0)
    with pytest.raises(ProbegenError, match=r"missing leaf value\(s\) \['b'\]"):
        g({"a": torch.zeros(2, 3, dtype=torch.float64)})


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + self.block(h))


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_fx_sequential_graph_matches_module_and_patches():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    g = graph_from_fx(seq)
    assert g.inputs == ["input"] and g.output == "2"
    assert [str(p) for p in all_paths(g)] == ["input -> 0 -> 1 -> 2"]
    x_r, x_c = torch.randn(7, 4), torch.randn(7, 4)
    assert torch.equal(g(x_r), seq(x_r))
    # activation patching of the ReLU == running the tail on the counterfactual ReLU output
    expect = seq[2](seq[1](seq[0](x_c)))
    assert torch.equal(activation_patch(g, x_r, x_c, "1"), expect)
    assert torch.equal(Patcher(g, x_r, x_c).output(node_patch(g, "1")), expect)


def test_fx_residual_graph_and_granularity():
    torch.manual_seed(0)
    m = Residual()
    g = graph_from_fx(m)
    assert sorted(str(p) for p in all_paths(g)) == [
        "x -> inp -> add.arg0 -> head", "x -> inp -> block.0 -> block.1 -> add.arg1 -> head"]
    coarse = graph_from_fx(m, leaf_modules={"block"})  # the user picks the granularity
    assert sorted(str(p) for p in all_paths(coarse)) == ["x -> inp -> add.arg0 -> head",
                                                         "x -> inp -> block -> add.arg1 -> head"]
    x_r, x_c = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(g(x_r), m(x_r)) and torch.allclose(coarse(x_r), m(x_r))
    # only the skip edge gets x_r: head(inp(x_r) + block(inp(x_c)))
    out = Patcher(coarse, x_r, x_c).output("{x -> inp -> add.arg0 -> head}")
    assert torch.allclose(out, m.head(m.inp(x_r) + m.block(m.inp(x_c))))


def test_fx_untraceable_model_is_one_clear_error():
    with pytest.raises(ProbegenError) as err:
        graph_from_fx(DataDependent())
    assert str(err.value).startswith("torch.fx cannot trace DataDependent:") and "\n" not in str(err.value)

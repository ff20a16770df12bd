"""graph_from_hf: the patched run is the Hugging Face GPT-2 itself, node and edge patches agree with hook-based
patching written against the model's modules, and bad input is one clear error."""

import random

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (pip install 'probegen[hf]') is not installed")
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402

from probegen.errors import ProbegenError  # noqa: E402
from probegen.patching import (EVERYTHING, NOTHING, Graph, Hypothesis, Patcher, edge_patch, node_patch,  # noqa: E402
                               parse_hypothesis)
from probegen.patching.bench import edge_closure, path_edges, random_path  # noqa: E402
from probegen.patching.hf import graph_from_hf  # noqa: E402
from probegen.patching.hooks import HookPatcher  # noqa: E402

V, T = 40, 7


def tiny_gpt2(seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    cfg = dict(n_layer=3, n_head=3, n_embd=24, vocab_size=V, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(GPT2Config(**{**cfg, **overrides})).to(dtype).eval()
    with torch.no_grad():  # larger than GPT-2's init, so that attention patterns and LayerNorms matter
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.normal_(0, 0.3)
    return model


def pairs(batch=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, T), generator=gen), torch.randint(0, V, (batch, T), generator=gen)


@pytest.mark.parametrize("granularity", ["head", "layer", "block"])
@pytest.mark.parametrize("per_position", [False, T])
def test_all_paths_is_the_reference_run_and_no_path_the_counterfactual(granularity, per_position):
    model = tiny_gpt2()
    x_r, x_c = pairs()
    g = graph_from_hf(model, granularity, per_position=per_position)
    p = Patcher(g, x_r, x_c)
    with torch.no_grad():
        ref, cf = model(x_r).logits, model(x_c).logits
    torch.testing.assert_close(p.output(EVERYTHING), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(p.output(NOTHING), cf, rtol=0, atol=1e-4)
    assert (ref - cf).abs().max() > 1.0  # the two runs differ, so the check means something


@pytest.mark.parametrize("overrides", [{}, {"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_weights": False},
                                       {"activation_function": "relu", "n_inner": 40},
                                       {"reorder_and_upcast_attn": True},
                                       {"reorder_and_upcast_attn": True, "attn_implementation": "eager"}])
def test_graph_reproduces_the_model_in_float64_to_rounding(overrides):
    upcast = overrides.get("attn_implementation") == "eager"  # eager + reorder: float32 scores (float64 fails in HF)
    model = tiny_gpt2(dtype=torch.float32 if upcast else torch.float64, **overrides)
    x_r, _ = pairs()
    with torch.no_grad():
        torch.testing.assert_close(graph_from_hf(model)(x_r), model(x_r).logits, rtol=0, atol=1e-5 if upcast else 1e-10)


def test_gpt2_model_output_and_last_position_logits():
    model = tiny_gpt2()
    x_r, _ = pairs()
    with torch.no_grad():
        hidden = graph_from_hf(model.transformer)(x_r)
        torch.testing.assert_close(hidden, model.transformer(x_r).last_hidden_state, rtol=0, atol=1e-5)
        last = graph_from_hf(model, logits="last")
        torch.testing.assert_close(last(x_r), model(x_r).logits[:, -1], rtol=0, atol=1e-4)
    assert graph_from_hf(model.transformer).output == "ln_f" and last.output == "lm_head"


def test_names_follow_the_model():
    g = graph_from_hf(tiny_gpt2())
    assert g.inputs[:2] == ["wte", "wpe"] and "h.0.attn.c_proj.bias" in g.inputs
    assert {"0.0", "2.2", "h.1.mlp", "lm_head"} <= set(g.nodes)
    assert set(g.slots("1.2")) == {"q", "k", "v"}
    assert "h.0.attn" in graph_from_hf(tiny_gpt2(), "layer").nodes
    assert "1.2@3" in graph_from_hf(tiny_gpt2(), per_position=T).nodes


# --------------------------------------------------------------------- cross-check: patching by model hooks


def hook_activation_patch(model, x_r, x_c, node):
    """Run on x_r with `node`'s output replaced by its output on x_c, with forward hooks on the HF modules."""
    body = model.transformer
    if node == "wte":
        module = body.wte
    elif node.startswith("h.") and node.endswith(".mlp"):
        module = body.h[int(node.split(".")[1])].mlp
    elif node.startswith("h.") and node.endswith(".attn"):
        module = body.h[int(node.split(".")[1])].attn
    else:  # head l.h: its slice of z, the input of c_proj
        layer, head = map(int, node.split("."))
        dh = model.config.n_embd // model.config.n_head
        cols = slice(head * dh, (head + 1) * dh)
        proj = body.h[layer].attn.c_proj
        saved = {}
        h = proj.register_forward_pre_hook(lambda m, a: saved.__setitem__("z", a[0]))
        with torch.no_grad():
            model(x_c)
        h.remove()

        def swap(m, a):
            z = a[0].clone()
            z[..., cols] = saved["z"][..., cols]
            return (z,)
        h = proj.register_forward_pre_hook(swap)
        with torch.no_grad():
            out = model(x_r).logits
        h.remove()
        return out
    saved = {}
    h = module.register_forward_hook(lambda m, a, o: saved.__setitem__("out", o))
    with torch.no_grad():
        model(x_c)
    h.remove()
    h = module.register_forward_hook(lambda m, a, o: saved["out"])
    with torch.no_grad():
        out = model(x_r).logits
    h.remove()
    return out


@pytest.mark.parametrize("granularity,nodes", [("head", ["wte", "0.1", "1.0", "2.2", "h.0.mlp", "h.2.mlp"]),
                                               ("layer", ["h.1.attn", "h.1.mlp"])])
def test_node_patching_equals_a_hook_based_activation_patch(granularity, nodes):
    model = tiny_gpt2()
    x_r, x_c = pairs()
    g = graph_from_hf(model, granularity)
    p = Patcher(g, x_r, x_c)
    for node in nodes:
        engine = p.output(node_patch(g, node))
        hooked = hook_activation_patch(model, x_r, x_c, node)
        torch.testing.assert_close(engine, hooked, rtol=0, atol=1e-4, msg=node)
        assert (engine - p.ref["lm_head"]).abs().max() > 1e-3, node  # the patch does something


def test_edge_patches_and_circuits_equal_one_hooked_forward_each():
    model = tiny_gpt2()
    x_r, x_c = pairs()
    g = graph_from_hf(model)
    p, hooks = Patcher(g, x_r, x_c), HookPatcher(model, x_r, x_c)
    for sender, receiver in [("0.1", "1.2.k"), ("wte", "0.0.q"), ("1.0", "h.2.mlp"), ("h.0.mlp", "lm_head"),
                             ("0.2", "2.1.v")]:
        engine = p.output(edge_patch(g, sender, receiver))
        torch.testing.assert_close(engine, hooks.output_without({(sender, receiver)}), rtol=0, atol=1e-4)
        assert (engine - p.ref["lm_head"]).abs().max() > 1e-4, (sender, receiver)
    rng = random.Random(0)
    static = {n for n in g.inputs if n.endswith(".bias")}
    for _ in range(4):  # circuits: the edges of a few random paths, and every path made of them
        edges = set().union(*(path_edges(random_path(g, rng, static)) for _ in range(rng.randint(2, 5))))
        hyp = Hypothesis(tuple(edge_closure(g, edges)))
        torch.testing.assert_close(p.output(hyp), hooks.output_with(edges), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ bad input


def test_unknown_architecture_is_one_clear_error():
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=8, vocab_size=10))
    with pytest.raises(ProbegenError, match="graph_from_hf: unsupported model BertModel \\(model_type 'bert'\\)"):
        graph_from_hf(bert)
    with pytest.raises(ProbegenError, match="unsupported model Linear"):
        graph_from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ProbegenError, match="add_cross_attention"):
        graph_from_hf(GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=V, add_cross_attention=True)))
    with pytest.raises(ProbegenError, match="granularity: expected one of"):
        graph_from_hf(tiny_gpt2(), "neuron")


def test_names_not_in_the_model_are_one_clear_error():
    g = graph_from_hf(tiny_gpt2(n_head=12, n_embd=24))
    with pytest.raises(ProbegenError, match=r"head '1\.13' is not in the model: 3 layers x 12 heads \(0\.0 \.\. 2\.11\)"):
        g.hypothesis("{wte -> 1.13 -> lm_head}")
    with pytest.raises(ProbegenError, match="unknown node '1.13'"):  # the generic parser names it too
        parse_hypothesis(g, "{wte -> 1.13 -> lm_head}")
    for ln in ("h.0.ln_1", "0.3.ln_1", "h.2.ln_2", "ln_f"):
        with pytest.raises(ProbegenError, match=f"'{ln}' is a LayerNorm, not a node or slot"):
            g.hypothesis(f"{{wte -> {ln} -> lm_head}}")
    with pytest.raises(ProbegenError, match="node '0.3' has no slot 'z'"):
        g.hypothesis("{wte -> 0.3.z -> lm_head}")
    with pytest.raises(ProbegenError, match="per_position=True"):
        g.hypothesis("{wte@0 -> lm_head}")
    assert str(g.hypothesis("{wte -> 1.11.q -> lm_head}")) == "{wte -> 1.11.q -> lm_head}"


def test_bad_token_input_is_one_clear_error():
    g = graph_from_hf(tiny_gpt2())
    with pytest.raises(ProbegenError, match="sequence length 20 > the model's context 16"):
        g(torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ProbegenError, match="expected integer token ids"):
        g(torch.zeros(2, 5))
    with pytest.raises(ProbegenError, match="built for length 7, got 5"):
        graph_from_hf(tiny_gpt2(), per_position=T)(torch.zeros(2, 5, dtype=torch.long))


def test_shared_slot_sums_are_bit_identical_to_the_plain_forward():
    g = graph_from_hf(tiny_gpt2(), per_position=T)
    leaves = g.leaf_values(pairs()[0])
    shared, plain = g.run(leaves=leaves), Graph.run(g, leaves=leaves)
    assert shared.keys() == plain.keys()
    for name in plain:
        assert torch.equal(shared[name], plain[name]), name


def test_engine_equals_brute_force_treeification_on_gpt2():
    # stacked hypotheses on the batch axis, LayerNorms inside receivers, per-head q/k/v: still exact
    model = tiny_gpt2(dtype=torch.float64, n_layer=2, n_head=2, n_embd=8)
    x_r, x_c = pairs(batch=2)
    g = graph_from_hf(model)
    p = Patcher(g, x_r, x_c)
    rng = random.Random(3)
    static = {n for n in g.inputs if n.endswith(".bias")}
    hyps = [Hypothesis(tuple(random_path(g, rng, static) for _ in range(k))) for k in (1, 3, 6, 12)]
    hyps += [g.hypothesis("{... -> 0.1 -> ...}"), g.hypothesis("{...} - {wte -> 1.0.k -> ...}")]
    for h, out in zip(hyps, p.outputs(hyps, chunk=3)):
        torch.testing.assert_close(out, p.brute_output(h), rtol=0, atol=1e-10, msg=str(h))

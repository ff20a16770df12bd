"""graph_from_lens: the patched run is the TransformerLens model itself, and node patches (whole heads, heads
and MLPs at one position) equal TransformerLens' own activation patching."""

import warnings

import pytest
import torch

pytest.importorskip("transformer_lens", reason="the lens extra (pip install 'probegen[lens]') is not installed")
from transformer_lens import HookedTransformer, HookedTransformerConfig, patching  # noqa: E402

from probegen.errors import ProbegenError  # noqa: E402
from probegen.patching import EVERYTHING, NOTHING, Patcher, node_patch  # noqa: E402
from probegen.patching.lens import graph_from_lens  # noqa: E402

V, T = 11, 6
CONFIGS = {
    "shortformer attn-only": dict(attn_only=True, positional_embedding_type="shortformer", normalization_type=None,
                                  act_fn=None),
    "LN gelu": dict(normalization_type="LN", act_fn="gelu_new", d_mlp=32),
    "LNPre relu bidirectional": dict(normalization_type="LNPre", act_fn="relu", d_mlp=32, attention_dir="bidirectional"),
    "RMS gated silu": dict(normalization_type="RMS", act_fn="silu", d_mlp=32, gated_mlp=True),
}


def tiny_lens(seed=0, **kw):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HookedTransformer's deprecation notice (removed in 4.0)
        cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=3, d_vocab=V, **kw)
        model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def pairs(batch=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, T), generator=gen), torch.randint(0, V, (batch, T), generator=gen)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("granularity", ["head", "layer", "block"])
def test_all_paths_is_the_reference_run_and_no_path_the_counterfactual(config, granularity):
    model = tiny_lens(**CONFIGS[config])
    x_r, x_c = pairs()
    with torch.no_grad():
        ref, cf = model(x_r), model(x_c)
    for per_position in (False, T):
        p = Patcher(graph_from_lens(model, granularity, per_position=per_position), x_r, x_c)
        scale = ref.abs().max()
        torch.testing.assert_close(p.output(EVERYTHING) / scale, ref / scale, rtol=0, atol=1e-5)
        torch.testing.assert_close(p.output(NOTHING) / scale, cf / scale, rtol=0, atol=1e-5)
    assert (ref - cf).abs().max() > 0.1 * scale


def test_names_follow_transformer_lens():
    g = graph_from_lens(tiny_lens(**CONFIGS["LN gelu"]))
    assert g.inputs[:2] == ["embed", "pos_embed"] and "blocks.1.attn.b_O" in g.inputs
    assert {"0.2", "blocks.1.mlp", "unembed"} <= set(g.nodes)
    short = graph_from_lens(tiny_lens(**CONFIGS["shortformer attn-only"]))
    assert "pos_embed" not in short.inputs and "blocks.0.mlp" not in short.nodes  # positions live inside heads
    assert "blocks.1.attn" in graph_from_lens(tiny_lens(**CONFIGS["LN gelu"]), "layer").nodes


def random_functional(shape, seed=2):
    R = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return lambda logits: (logits * R).sum()


@pytest.mark.parametrize("config", ["shortformer attn-only", "LN gelu"])
def test_node_patching_equals_transformer_lens_activation_patching(config):
    model = tiny_lens(**CONFIGS[config])
    x_r, x_c = pairs()
    _, cache_c = model.run_with_cache(x_c)
    metric = random_functional((3, T, V))  # a random linear read-out of all logits: equal outputs, equal values
    # TransformerLens patches cache_c's activations into a run on x_r: our node patch of x_c into x_r
    heads = patching.get_act_patch_attn_head_out_all_pos(model, x_r, cache_c, metric)  # (layers, heads)
    by_pos = patching.get_act_patch_attn_head_out_by_pos(model, x_r, cache_c, metric)  # (layers, pos, heads)
    g, g_pos = graph_from_lens(model), graph_from_lens(model, per_position=T)
    p, p_pos = Patcher(g, x_r, x_c), Patcher(g_pos, x_r, x_c)
    for layer in range(2):
        for head in range(3):
            ours = metric(p.output(node_patch(g, f"{layer}.{head}")))
            torch.testing.assert_close(ours, heads[layer, head], rtol=1e-5, atol=1e-3)
            for t in (0, T - 1):
                ours = metric(p_pos.output(node_patch(g_pos, f"{layer}.{head}@{t}")))
                torch.testing.assert_close(ours, by_pos[layer, t, head], rtol=1e-5, atol=1e-3)
    assert heads.std() > 1.0  # patches differ from each other: the comparison is not between constants
    if model.cfg.attn_only:
        return
    mlp = patching.get_act_patch_mlp_out(model, x_r, cache_c, metric)  # (layers, pos)
    for layer in range(2):
        for t in range(T):
            ours = metric(p_pos.output(node_patch(g_pos, f"blocks.{layer}.mlp@{t}")))
            torch.testing.assert_close(ours, mlp[layer, t], rtol=1e-5, atol=1e-3)


def test_unsupported_configurations_are_one_clear_error():
    with pytest.raises(ProbegenError, match="positional_embedding_type 'rotary' is not supported"):
        graph_from_lens(tiny_lens(positional_embedding_type="rotary", normalization_type="LN", act_fn="gelu", d_mlp=8,
                                  rotary_dim=4))
    with pytest.raises(ProbegenError, match="parallel_attn_mlp=True is not supported"):
        graph_from_lens(tiny_lens(parallel_attn_mlp=True, normalization_type="LN", act_fn="gelu", d_mlp=8))
    with pytest.raises(ProbegenError, match="expected a TransformerLens HookedTransformer"):
        graph_from_lens(torch.nn.Linear(2, 2))
    g = graph_from_lens(tiny_lens(**CONFIGS["LN gelu"]))
    with pytest.raises(ProbegenError, match=r"head '1\.3' is not in the model: 2 layers x 3 heads"):
        g.hypothesis("{embed -> 1.3.v -> unembed}")
    with pytest.raises(ProbegenError, match="'blocks.0.ln1' is a LayerNorm"):
        g.hypothesis("{embed -> blocks.0.ln1 -> unembed}")

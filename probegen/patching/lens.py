"""TransformerLens `HookedTransformer` models (TransformerLens 3.x) as path-patching graphs.

    from transformer_lens import HookedTransformer, HookedTransformerConfig
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=40, d_head=16, n_heads=4,
                                                      d_vocab=64, attn_only=True, act_fn=None,
                                                      positional_embedding_type="shortformer"))
    g = graph_from_lens(model)
    g.hypothesis("{embed -> 1.5.q -> unembed, embed -> 1.5.v -> unembed, embed -> 0.0 -> 1.5.k -> unembed}")

Names follow TransformerLens: leaves "embed" and "pos_embed" (absent for shortformer models, whose
positions enter only the q and k inputs of every head, inside the head's function), heads "l.h", attention
layers "blocks.l.attn", MLPs "blocks.l.mlp", blocks "blocks.l", the constant leaf "blocks.l.attn.b_O" at head
granularity, output "unembed" (ln_final included).

Why TransformerLens 3.x: 4.x removed HookedTransformer; its TransformerBridge wraps a Hugging Face model (for
GPT-2 use graph_from_hf on `bridge.original_model`) and has no shortformer positions, so it cannot express
the path patching paper's attention-only model. 3.9's HookedTransformer maps exactly for the configurations
accepted here: LayerNorm / RMSNorm (with or without weights) or none, standard or shortformer positions,
causal or bidirectional attention, any MLP module TransformerLens builds. Others are refused by name.
"""

import torch

from probegen.errors import ProbegenError
from probegen.patching.lm import LMSpec, Names, build_graph

LENS_NAMES = Names(tok="embed", pos="pos_embed", attn="blocks.{l}.attn", mlp="blocks.{l}.mlp", block="blocks.{l}",
                   bias="blocks.{l}.attn.b_O", out="unembed", norms=("ln1", "ln2", "ln_final"))


def graph_from_lens(model, granularity="head", per_position=False, logits="all"):
    """Path-patching graph of a TransformerLens HookedTransformer (arguments as graph_from_hf)."""
    return build_graph(LensSpec(model), granularity, per_position, logits)


# (config attribute, value that is supported) for features that have no exact mapping here
_UNSUPPORTED = [("parallel_attn_mlp", False), ("use_normalization_before_and_after", False), ("n_key_value_heads", None),
                ("use_attention_sinks", False), ("use_logn_attn", False), ("clip_qkv", None), ("use_qk_norm", False),
                ("use_local_attn", False), ("load_in_4bit", False)]


class LensSpec(LMSpec):
    def __init__(self, model):
        try:
            from transformer_lens import HookedTransformer
        except ImportError:
            raise ProbegenError("graph_from_lens needs TransformerLens 3.x: pip install 'probegen[lens]'") from None
        if type(model).__name__ == "TransformerBridge":
            raise ProbegenError("graph_from_lens: a TransformerBridge wraps a Hugging Face model; use "
                                "graph_from_hf(bridge.original_model) for GPT-2 models")
        if not isinstance(model, HookedTransformer):
            raise ProbegenError(f"graph_from_lens: unsupported model {type(model).__name__}; expected a "
                                "TransformerLens HookedTransformer")
        cfg = self.cfg = model.cfg
        self._check(cfg)
        self.model = model
        self.names = LENS_NAMES
        self.n_layers, self.n_heads, self.d_head, self.n_ctx = cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.n_ctx
        self.causal = cfg.attention_dir == "causal"
        self.has_mlp = not cfg.attn_only
        self.shortformer = cfg.positional_embedding_type == "shortformer"

    @staticmethod
    def _check(cfg):
        if cfg.positional_embedding_type not in ("standard", "shortformer"):
            raise ProbegenError(f"graph_from_lens: positional_embedding_type {cfg.positional_embedding_type!r} is not "
                                "supported (standard, shortformer)")
        for key, ok in _UNSUPPORTED:
            value = getattr(cfg, key, ok)
            if value != ok and not (key == "n_key_value_heads" and value == cfg.n_heads):  # GQA with groups of 1 is MHA
                raise ProbegenError(f"graph_from_lens: {key}={getattr(cfg, key)!r} is not supported")
        for key in ("attn_scores_soft_cap", "output_logits_soft_cap"):
            if (getattr(cfg, key, -1.0) or -1.0) > 0:
                raise ProbegenError(f"graph_from_lens: {key}={getattr(cfg, key)!r} is not supported")
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
        if cfg.original_architecture in POST_NORM_ARCHITECTURES:
            raise ProbegenError(f"graph_from_lens: post-norm architecture {cfg.original_architecture!r} is not supported")
        if cfg.attention_dir not in ("causal", "bidirectional"):
            raise ProbegenError(f"graph_from_lens: attention_dir {cfg.attention_dir!r} is not supported")

    def embed(self, tokens):
        tok = self.model.embed(tokens)
        return tok, (None if self.shortformer else self.model.pos_embed(tokens))

    def shortformer_pos(self, T):
        return self.model.pos_embed.W_pos[:T]

    def ln1(self, layer, x):
        return self.model.blocks[layer].ln1(x)

    def ln2(self, layer, x):
        return self.model.blocks[layer].ln2(x)

    def mlp(self, layer, x):
        return self.model.blocks[layer].mlp(x)

    def unembed(self, x):
        if self.cfg.normalization_type is not None:
            x = self.model.ln_final(x)
        return self.model.unembed(x)

    def params(self, layer):
        attn = self.model.blocks[layer].attn
        return attn.W_Q, attn.W_K, attn.W_V, attn.b_Q, attn.b_K, attn.b_V, attn.W_O, attn.b_O

    def raw_weights(self, layer):
        attn = self.model.blocks[layer].attn
        fuse_in = lambda W: W.permute(1, 0, 2).reshape(W.shape[1], -1)  # (H, d, dh) -> (d, H*dh), head-major
        return (fuse_in(attn.W_Q), fuse_in(attn.W_K), fuse_in(attn.W_V), attn.b_Q.flatten(), attn.b_K.flatten(),
                attn.b_V.flatten(), attn.W_O.flatten(0, 1), attn.b_O)

    def scale(self, layer):
        return 1.0 / self.model.blocks[layer].attn.attn_scale

    def attn_proj(self, layer, z):
        W_O, b_O = self.qkv(layer)[6:]
        return torch.nn.functional.linear(z, W_O.T, b_O)

"""Hugging Face `transformers` GPT-2-architecture models as path-patching graphs.

    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config()).eval()          # or .from_pretrained("gpt2", local_files_only=True)
    g = graph_from_hf(model)                              # heads "l.h" (slots q, k, v), MLPs "h.l.mlp"
    g.hypothesis("{wte -> 5.6.v -> lm_head, ... -> 6.1 -> lm_head}")

Names follow the model's own module names (`model.transformer.<name>`): leaves "wte" and "wpe", heads
"l.h", attention layers "h.l.attn", MLPs "h.l.mlp", blocks "h.l", and at head granularity the constant leaf
"h.l.attn.c_proj.bias" (the attention output bias, which belongs to no head); the output is "lm_head"
(GPT2LMHeadModel, logits) or "ln_f" (GPT2Model, the final hidden state).

The graph reproduces GPT-2's forward in eval mode (no dropout) with the model's own parameters and
modules: ln_1 / ln_2 / ln_f and the MLP are the model's modules, c_attn is split into per-head q / k / v
columns, the attention scale follows `scale_attn_weights`, `scale_attn_by_inverse_layer_idx` and
`reorder_and_upcast_attn` (eager attention only, as in the model), the causal softmax runs in the model's precision, and c_proj is split into
per-head row blocks of W_O. Inputs are token ids (B, T) without padding (no attention mask).
"""

import torch

from probegen.errors import ProbegenError
from probegen.patching.lm import LMSpec, Names, build_graph

HF_NAMES = Names(tok="wte", pos="wpe", attn="h.{l}.attn", mlp="h.{l}.mlp", block="h.{l}",
                 bias="h.{l}.attn.c_proj.bias", out="lm_head", norms=("ln_1", "ln_2", "ln_f"))
SUPPORTED = ("GPT2LMHeadModel", "GPT2Model")


def graph_from_hf(model, granularity="head", per_position=False, logits="all"):
    """Path-patching graph of a Hugging Face GPT-2-architecture model (see the module docstring).

    granularity: "head" (heads with q/k/v slots, MLPs), "layer" (attention layers with q/k/v slots, MLPs) or
    "block"; per_position: False, or the sequence length T to split every node by position; logits: "all"
    positions or only the "last" one."""
    return build_graph(GPT2Spec(model), granularity, per_position, logits)


class GPT2Spec(LMSpec):
    def __init__(self, model):
        try:
            from transformers import GPT2LMHeadModel, GPT2Model
        except ImportError:
            raise ProbegenError("graph_from_hf needs the Hugging Face transformers package: "
                                "pip install 'probegen[hf]'") from None
        if isinstance(model, GPT2LMHeadModel):
            self.body, self.head = model.transformer, model.lm_head
        elif isinstance(model, GPT2Model):
            self.body, self.head = model, None
        else:
            kind = getattr(getattr(model, "config", None), "model_type", None)
            raise ProbegenError(f"graph_from_hf: unsupported model {type(model).__name__}"
                                f"{f' (model_type {kind!r})' if kind else ''}; supported: GPT-2-architecture "
                                f"models ({', '.join(SUPPORTED)})")
        cfg = self.body.config
        if getattr(cfg, "add_cross_attention", False):
            raise ProbegenError("graph_from_hf: add_cross_attention=True (an encoder-decoder GPT-2) is not supported")
        self.cfg = cfg
        self.names = HF_NAMES if self.head is not None else Names(**{**HF_NAMES.__dict__, "out": "ln_f",
                                                                     "norms": ("ln_1", "ln_2")})
        self.n_layers, self.n_heads = cfg.n_layer, cfg.n_head
        self.d_head = cfg.n_embd // cfg.n_head
        self.n_ctx = cfg.n_positions
        eager = getattr(cfg, "_attn_implementation", "eager") == "eager"
        self.upcast_scores = bool(cfg.reorder_and_upcast_attn and eager)  # the model upcasts only when eager

    def params(self, layer):
        attn = self.body.h[layer].attn
        return attn.c_attn.weight, attn.c_attn.bias, attn.c_proj.weight, attn.c_proj.bias

    def raw_weights(self, layer):
        """c_attn (Conv1D: x @ W + b, W (d, 3d)) -> column blocks for q, k, v; c_proj -> W_O (d, d), b_O."""
        attn, d = self.body.h[layer].attn, self.cfg.n_embd
        W, b = attn.c_attn.weight, attn.c_attn.bias
        return (W[:, :d], W[:, d:2 * d], W[:, 2 * d:], b[:d], b[d:2 * d], b[2 * d:], attn.c_proj.weight,
                attn.c_proj.bias)

    def embed(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        tok = self.body.wte(tokens)
        return tok, self.body.wpe(positions).expand_as(tok)

    def ln1(self, layer, x):
        return self.body.h[layer].ln_1(x)

    def ln2(self, layer, x):
        return self.body.h[layer].ln_2(x)

    def mlp(self, layer, x):
        mlp = self.body.h[layer].mlp
        return mlp.c_proj(mlp.act(mlp.c_fc(x)))  # the module without its dropout (eval semantics)

    def unembed(self, x):
        x = self.body.ln_f(x)
        return x if self.head is None else self.head(x)

    def scale(self, layer):
        scale = self.d_head ** -0.5 if self.cfg.scale_attn_weights else 1.0
        return scale / (layer + 1) if self.cfg.scale_attn_by_inverse_layer_idx else scale

    def attn_proj(self, layer, z):
        return self.body.h[layer].attn.c_proj(z)

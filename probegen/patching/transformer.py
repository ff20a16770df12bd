"""A small attention-only transformer (no LayerNorm, no MLP) with Shortformer positions, and its patch graph.

Shortformer: the positional embedding is added to the query and key inputs of every head, never to the
residual stream, so values (and thus everything a head writes) carry token information only.

    resid_0 = W_E[tokens]                                       (B, T, d)
    head l.h(q_in, k_in, v_in) = softmax_causal((q_in + pos) W_Q · (k_in + pos) W_K / sqrt(dh)) v_in W_V W_O
    resid_{l+1} = resid_l + sum_h head l.h(resid_l, resid_l, resid_l)
    logits = resid_L W_U                                        (B, T, V)

`patch_graph()` exposes the model to the path-patching engine: leaf "emb" (the token embedding), one node
per head named "l.h" with slots q, k, v fed by "emb" and every head of earlier layers, and "out" (the
unembedding) with one slot fed by everything. granularity="layer" gives one node "l" per layer instead.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from probegen.errors import ProbegenError
from probegen.patching.graph import Graph, Node


@dataclass
class TransformerConfig:
    vocab: int = 64
    seq_len: int = 40
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_head: int = 16


class AttnOnlyTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        L, H, d, dh = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_E = nn.Parameter(torch.randn(cfg.vocab, d))  # std 1: std 0.1 gave no induction (REFERENCE)
        self.W_pos = nn.Parameter(torch.randn(cfg.seq_len, d))
        self.W_Q = nn.Parameter(torch.randn(L, H, d, dh) / math.sqrt(d))
        self.W_K = nn.Parameter(torch.randn(L, H, d, dh) / math.sqrt(d))
        self.W_V = nn.Parameter(torch.randn(L, H, d, dh) / math.sqrt(d))
        self.W_O = nn.Parameter(torch.randn(L, H, dh, d) / math.sqrt(dh))
        self.W_U = nn.Parameter(torch.randn(d, cfg.vocab) / math.sqrt(d))

    def _proj(self, W, x):
        """x (B, T, d) times per-head weights W (H', d, dh) -> (B, H', T, dh), one matmul for all heads."""
        H, d, dh = W.shape
        return (x @ W.transpose(0, 1).reshape(d, H * dh)).view(*x.shape[:-1], H, dh).transpose(-3, -2)

    def attention(self, layer, q_in, k_in, heads=None):
        """Attention patterns (B, H', T, T) of `heads` (default all) of `layer` from q/k inputs (B, T, d)."""
        heads = list(range(self.cfg.n_heads)) if heads is None else heads
        T = q_in.shape[1]
        pos = self.W_pos[:T]
        q = self._proj(self.W_Q[layer, heads], q_in + pos)
        k = self._proj(self.W_K[layer, heads], k_in + pos)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.cfg.d_head)  # (B, H', T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q_in.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)

    def heads_out(self, layer, q_in, k_in, v_in, heads=None):
        """Sum of the outputs of `heads` (default all) of `layer`: (B, T, d) written into the residual."""
        heads = list(range(self.cfg.n_heads)) if heads is None else heads
        T = q_in.shape[1]
        pos = self.W_pos[:T]
        q = self._proj(self.W_Q[layer, heads], q_in + pos)  # (B, H', T, dh)
        k = self._proj(self.W_K[layer, heads], k_in + pos)
        v = self._proj(self.W_V[layer, heads], v_in)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # fused; same maths as attention() @ v
        z = z.transpose(-3, -2).flatten(-2)  # (B, T, H' * dh)
        return z @ self.W_O[layer, heads].flatten(0, 1)

    def forward(self, tokens, return_patterns=False):
        """tokens (B, T) int64 -> logits (B, T, V); with return_patterns also [(B, H, T, T)] per layer."""
        resid = self.W_E[tokens]  # (B, T, d)
        patterns = []
        for layer in range(self.cfg.n_layers):
            if return_patterns:
                patterns.append(self.attention(layer, resid, resid))
            resid = resid + self.heads_out(layer, resid, resid, resid)
        logits = resid @ self.W_U
        return (logits, patterns) if return_patterns else logits

    def patch_graph(self, granularity="head"):
        """The model as a path-patching Graph; the raw input is the token tensor (B, T)."""
        cfg = self.cfg
        if granularity == "head":
            units = [(layer, (head,)) for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
            name = lambda layer, heads: f"{layer}.{heads[0]}"
        elif granularity == "layer":
            units = [(layer, tuple(range(cfg.n_heads))) for layer in range(cfg.n_layers)]
            name = lambda layer, heads: f"{layer}"
        else:
            raise ProbegenError(f"granularity: expected 'head' or 'layer', got {granularity!r}")
        nodes, upstream = [], ["emb"]
        for layer in range(cfg.n_layers):
            here = [(name(l, h), h) for l, h in units if l == layer]
            for node_name, heads in here:
                feeds = tuple(upstream)
                nodes.append(Node(node_name, self._unit_fn(layer, list(heads)), {"q": feeds, "k": feeds, "v": feeds}))
            upstream += [n for n, _ in here]
        nodes.append(Node("out", lambda resid: resid @ self.W_U, {"resid": tuple(upstream)}))
        return Graph(["emb"], nodes, "out", embed=lambda tokens: {"emb": self.W_E[tokens]})

    def _unit_fn(self, layer, heads):
        def fn(q, k, v):  # (N, T, d) each -> (N, T, d); the slots are residual-stream inputs, pos added inside
            return self.heads_out(layer, q, k, v, heads)
        return fn


def induction_by_construction(vocab=12, seq_len=24, n_heads=2, scale=40.0):
    """A 2-layer model whose weights are written by hand: head 0.0 copies the previous token, head 1.1 does
    induction by K-composition with 0.0. All other heads are zero. Returns the model.

    Residual layout (d_model = 3V + T): [E: current token | P: previous token (written by 0.0) |
    U: prediction (written by 1.1) | a block the positional embedding uses]. W_U reads only U, so the direct
    path emb -> out carries nothing and the prediction exists only through 1.1.
      0.0: query pos t matches key pos t-1 (positions one-hot in their own block), value = E, output -> P.
      1.1: query = E at t, key = P at s, so it attends where the previous token equals the current token,
           value = E at s (the token after the earlier occurrence), output -> U.
    """
    V, T = vocab, seq_len
    E, P, U, POS = 0, V, 2 * V, 3 * V
    d = 3 * V + T
    cfg = TransformerConfig(vocab=V, seq_len=T, d_model=d, n_layers=2, n_heads=n_heads, d_head=max(V, T))
    model = AttnOnlyTransformer(cfg)
    eye_v, eye_t = torch.eye(V), torch.eye(T)
    sq = math.sqrt(cfg.d_head)  # cancels the 1/sqrt(dh) of the scores, so `scale` is the logit gap
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[:, E:E + V] = eye_v
        model.W_pos[:, POS:POS + T] = eye_t
        # 0.0: q(t) = e_t, k(s) = e_{s+1}  ->  score scale at s = t-1
        model.W_Q[0, 0, POS:POS + T, :T] = eye_t * scale * sq
        model.W_K[0, 0, POS:POS + T - 1, 1:T] = eye_t[:T - 1, :T - 1]
        model.W_V[0, 0, E:E + V, :V] = eye_v
        model.W_O[0, 0, :V, P:P + V] = eye_v
        # 1.1: q(t) = onehot(tok_t), k(s) = onehot(tok_{s-1})  ->  score scale where they match
        model.W_Q[1, 1, E:E + V, :V] = eye_v * scale * sq
        model.W_K[1, 1, P:P + V, :V] = eye_v
        model.W_V[1, 1, E:E + V, :V] = eye_v
        model.W_O[1, 1, :V, U:U + V] = eye_v
        model.W_U[U:U + V, :] = eye_v * scale / 4
    return model

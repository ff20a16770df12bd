"""Ground truth by construction: RASP programs compiled by tracr, ported to a TransformerLens model, with the
circuit the compiler built.

    prog = compile_program("sort_unique")          # tracr: RASP -> craft blocks -> weights (needs jax)
    model = to_lens(prog)                            # the same weights in a HookedTransformer (float32)
    g = graph_from_lens(model)
    circuit = circuit_paths(prog, informative=True)  # the compiled circuit's paths, as path strings

tracr allocates every RASP operation to attention heads or MLPs and gives each value a named subspace of the
residual stream ("tokens:a", "indices:3", "one", "hist:2", ...). From the compiler's own blocks we read, for
every head, the labels its query, key and value read and the labels it writes; for every MLP (tracr may put
several operations side by side in one MLP layer) the same per operation. A model path
`leaf -> c1.slot -> ... -> unembed` belongs to the compiled circuit when a chain of labels runs along it: each
sender writes a label that the receiver reads through that slot, and the last component writes the
program's output. It is *informative* when the chain starts at a token-value label ("tokens:<v>"): positions
(the same for every input of one length), "one" and the BOS direction are constant, so paths that carry only
them cannot change between a reference and a counterfactual input.

The compiled models have no LayerNorm, ReLU MLPs, non-causal attention (unless compiled causal), BOS first.
"""

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from probegen.errors import ProbegenError


def _require_tracr():
    try:
        import tracr  # noqa: F401
    except ImportError:
        raise ProbegenError("tracr is not installed: pip install 'probegen[tracr]' (tracr-pypi, needs jax)") from None


def programs():
    """The programs of the ground-truth table: name -> (RASP program builder, vocab, max_seq_len, sampler)."""
    _require_tracr()
    from tracr.compiler import lib
    from tracr.rasp import rasp
    return {
        "hist": (lambda: lib.make_hist(), {"a", "b", "c", "d"}, 6, "iid"),
        # 5 distinct tokens of 8, so that the sorted output varies between inputs
        "sort_unique": (lambda: lib.make_sort_unique(rasp.tokens, rasp.tokens), set(range(1, 9)), 5, "permutation"),
        "frac_prevs": (lambda: lib.make_frac_prevs(rasp.numerical(rasp.tokens == "x").named("is_x")),
                       {"x", "y", "z"}, 6, "iid"),
        "pair_balance": (lambda: lib.make_pair_balance(rasp.tokens, "(", ")"), {"(", ")", "a"}, 6, "iid"),
    }


@dataclass
class Component:
    name: str  # the TransformerLens graph node: "l.h" or "blocks.l.mlp"
    layer: int
    kind: str  # "attn" | "mlp"
    units: list = field(default_factory=list)  # [(rasp label, {slot: reads}, writes)], labels as strings


@dataclass
class Compiled:
    name: str
    assembled: object  # tracr AssembledTransformerModel
    components: list  # [Component], in residual-stream order
    output_labels: list  # residual labels the unembedding reads, in output order
    categorical: bool
    vocab: list
    max_seq_len: int
    sampler: str
    bos: str = "BOS"


def compile_program(name, causal=False):
    """Compile one of `programs()` with tracr and read off which heads and MLPs compute which labels."""
    table = programs()
    if name not in table:
        raise ProbegenError(f"tracr program {name!r}: unknown (known: {', '.join(table)})")
    make, vocab, max_seq_len, sampler = table[name]
    from tracr.compiler import (assemble, basis_inference, craft_graph_to_model, craft_model_to_transformer,
                                expr_to_craft_graph, nodes, rasp_to_graph)
    from tracr.craft import bases, transformers
    from tracr.rasp import rasp

    program = make()
    # the steps of tracr's compile_rasp_to_model, kept apart so that the graph and craft model stay at hand
    extracted = rasp_to_graph.extract_rasp_graph(program)
    graph, sources, sink = extracted.graph, extracted.sources, extracted.sink
    basis_inference.infer_bases(graph, sink, vocab, max_seq_len)
    expr_to_craft_graph.add_craft_components_to_rasp_graph(graph, bos_dir=bases.BasisDirection(rasp.tokens.label, "BOS"))
    craft_model = craft_graph_to_model.craft_graph_to_model(graph, sources)
    assembled = craft_model_to_transformer.craft_model_to_transformer(
        craft_model=craft_model, graph=graph, sink=sink, max_seq_len=max_seq_len, causal=causal,
        compiler_bos="BOS", compiler_pad="PAD")
    _, module_names = assemble._get_model_config_and_module_names(craft_model)
    components = _components(graph, sources, craft_model, module_names, craft_graph_to_model, nodes, transformers)
    output_labels = [str(d) for d in sink[nodes.OUTPUT_BASIS]]
    return Compiled(name, assembled, components, output_labels, rasp.is_categorical(sink[nodes.EXPR]),
                    sorted(vocab, key=str), max_seq_len, sampler)


def _components(graph, sources, craft_model, module_names, c2m, nodes, transformers):
    """Match the compiler's per-operation blocks to the model's heads and MLP layers."""
    by_layer_no = defaultdict(list)  # tracr's half-layer index -> [(rasp label, block)], in allocation order
    for node_id, layer_no in c2m._allocate_modules_to_layers(graph, sources).items():
        node = graph.nodes[node_id]
        block, label = node.get(nodes.MODEL_BLOCK), node[nodes.EXPR].label
        if isinstance(block, transformers.SeriesWithResiduals):  # selector width: attention then MLP
            by_layer_no[layer_no].append((label, block.blocks[0]))
            by_layer_no[layer_no + 1].append((label, block.blocks[1]))
        elif block is not None:
            by_layer_no[layer_no].append((label, block))
    layer_nos = sorted(k for k, v in by_layer_no.items() if v)
    if len(layer_nos) != len(craft_model.blocks):
        raise ProbegenError("tracr: could not match the compiler's blocks to model layers")
    components = []
    for layer_no, model_block, module in zip(layer_nos, craft_model.blocks, module_names):
        layer = int(module.split("/")[1].split("_")[1])  # "transformer/layer_3/attn"
        if module.endswith("attn"):
            heads = list(model_block.as_multi().heads())
            ops = [(label, h) for label, block in by_layer_no[layer_no] for h in block.as_multi().heads()]
            if len(ops) != len(heads) or any(a is not b for (_, a), b in zip(ops, heads)):
                raise ProbegenError("tracr: head order of the compiled layer does not match the operations")
            for h, (label, head) in enumerate(ops):
                reads = {"q": _labels(head.w_qk.left_space), "k": _labels(head.w_qk.right_space),
                         "v": _labels(head.w_ov.input_space)}
                components.append(Component(f"{layer}.{h}", layer, "attn", [(label, reads, _labels(head.w_ov.output_space))]))
        else:
            units = [(label, {None: _labels(m.fst.input_space)}, _labels(m.snd.output_space))
                     for label, m in by_layer_no[layer_no]]
            components.append(Component(f"blocks.{layer}.mlp", layer, "mlp", units))
    return components


def _labels(space):
    return frozenset(str(d) for d in space.basis)


# ---------------------------------------------------------------------------------------------- the port


def to_lens(compiled):
    """The compiled weights in a TransformerLens HookedTransformer (float32, eval mode)."""
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig
    a = compiled.assembled
    cfg, params = a.model_config, {k: {n: np.asarray(v) for n, v in d.items()} for k, d in a.params.items()}
    W_E, W_pos = params["token_embed"]["embeddings"], params["pos_embed"]["embeddings"]
    D, H, K = W_E.shape[1], cfg.num_heads, cfg.key_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HookedTransformer's deprecation notice
        lens_cfg = HookedTransformerConfig(
            n_layers=cfg.num_layers, d_model=D, n_ctx=W_pos.shape[0], d_head=K, n_heads=H, d_mlp=cfg.mlp_hidden_size,
            d_vocab=W_E.shape[0], d_vocab_out=len(compiled.output_labels), act_fn="relu", normalization_type=None,
            attention_dir="causal" if cfg.causal else "bidirectional", positional_embedding_type="standard")
        model = HookedTransformer(lens_cfg)
    t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32)
    state = {"embed.W_E": t(W_E), "pos_embed.W_pos": t(W_pos), "unembed.W_U": t(unembed_matrix(compiled)),
             "unembed.b_U": torch.zeros(len(compiled.output_labels))}
    for layer in range(cfg.num_layers):
        pre, att = f"blocks.{layer}", params
        for ours, theirs in (("Q", "query"), ("K", "key"), ("V", "value")):
            p = att[f"transformer/layer_{layer}/attn/{theirs}"]
            state[f"{pre}.attn.W_{ours}"] = t(p["w"]).reshape(D, H, K).permute(1, 0, 2)  # (d, H*K) -> (H, d, K)
            state[f"{pre}.attn.b_{ours}"] = t(p["b"]).reshape(H, K)
        out = att[f"transformer/layer_{layer}/attn/linear"]
        state[f"{pre}.attn.W_O"], state[f"{pre}.attn.b_O"] = t(out["w"]).reshape(H, K, D), t(out["b"])
        fc1, fc2 = att[f"transformer/layer_{layer}/mlp/linear_1"], att[f"transformer/layer_{layer}/mlp/linear_2"]
        state.update({f"{pre}.mlp.W_in": t(fc1["w"]), f"{pre}.mlp.b_in": t(fc1["b"]),
                      f"{pre}.mlp.W_out": t(fc2["w"]), f"{pre}.mlp.b_out": t(fc2["b"])})
    missing = model.load_state_dict(state, strict=False)
    if [k for k in missing.missing_keys if not k.endswith(("IGNORE", "mask"))] or missing.unexpected_keys:
        raise ProbegenError(f"tracr port: state dict mismatch {missing}")
    return model.eval()


def unembed_matrix(compiled):
    """(D, n_out): reads the output labels of the residual stream, as tracr's unembedding does."""
    labels = compiled.assembled.residual_labels
    W = np.zeros((len(labels), len(compiled.output_labels)), dtype=np.float32)
    for j, label in enumerate(compiled.output_labels):
        W[labels.index(label), j] = 1.0
    return W


def encode(compiled, sequences):
    """Token sequences (without BOS) -> ids (B, 1 + T) with tracr's input encoder."""
    enc = compiled.assembled.input_encoder
    return torch.tensor([enc.encode([compiled.bos] + list(s)) for s in sequences], dtype=torch.long)


def sample_inputs(compiled, n, seed, length=None):
    """n random inputs of the program's kind: i.i.d. tokens, or permutations (sort_unique needs unique keys)."""
    rng = np.random.default_rng(seed)
    T = length or compiled.max_seq_len
    if compiled.sampler == "permutation":
        seqs = [list(rng.permutation(compiled.vocab)[:T]) for _ in range(n)]
    else:
        seqs = [list(rng.choice(np.array(compiled.vocab, dtype=object), T)) for _ in range(n)]
    return encode(compiled, seqs)


def tracr_residual(compiled, tokens):
    """tracr's own final residual stream (B, T, D) for token ids, through its jax forward."""
    import jax.numpy as jnp
    out = compiled.assembled.forward(compiled.assembled.params, jnp.asarray(tokens.numpy()))
    return torch.tensor(np.asarray(out.transformer_output.output))


# ------------------------------------------------------------------------------------------- the circuit


def circuit_paths(compiled, informative=False):
    """The compiled circuit's model paths (strings in graph_from_lens names), in a deterministic order."""
    comps = compiled.components
    leaf_writes = {"embed": {lab for lab in compiled.assembled.residual_labels if lab.startswith("tokens:") or lab == "one"},
                   "pos_embed": {lab for lab in compiled.assembled.residual_labels if lab.startswith("indices:")}}
    varying = {f"tokens:{v}" for v in compiled.vocab}
    found = set()

    def senders_of(comp):  # earlier components that feed `comp` in the model graph
        same_layer = lambda c: c.layer == comp.layer and c.kind == "attn" and comp.kind == "mlp"
        return [c for c in comps if c.layer < comp.layer or same_layer(c)]

    def walk(comp, unit, suffix):
        _, reads, _ = unit
        for slot, labels in reads.items():
            elem = comp.name if slot is None else f"{comp.name}.{slot}"
            for leaf, writes in leaf_writes.items():
                carried = labels & writes
                if carried and (not informative or carried & varying):
                    found.add(" -> ".join([leaf, elem] + suffix))
            for sender in senders_of(comp):
                for sender_unit in sender.units:
                    if labels & sender_unit[2]:
                        walk(sender, sender_unit, [elem] + suffix)

    outputs = set(compiled.output_labels)
    for comp in comps:
        for unit in comp.units:
            if unit[2] & outputs:
                walk(comp, unit, ["unembed"])
    return sorted(found)


# ------------------------------------------------------------------------------------------- the table


def mismatch(mask):
    """d for one-hot outputs: the fraction of (unmasked) positions whose argmax differs from the reference's."""
    def d(ref, out):
        wrong = (ref.argmax(-1) != out.argmax(-1)).double()
        return (wrong * mask).sum(1) / mask.sum(1)
    return d


def score_program(compiled, n_pairs=256, seed=0, n_boot=200):
    """Compile (given a name), port, and score the compiled circuit on random (x_r, x_c) pairs (positions after BOS):
    rows for the whole compiled circuit, its informative paths, their complement, and the informative paths
    with each one removed. d: squared error of the output scores; for categorical outputs also `mismatch`."""
    from probegen.patching.engine import Patcher
    from probegen.patching.evaluate import effects, squared_error, summarize
    from probegen.patching.lens import graph_from_lens
    from probegen.patching.paths import NOTHING

    compiled = compile_program(compiled) if isinstance(compiled, str) else compiled
    graph = graph_from_lens(to_lens(compiled))
    x_r, x_c = sample_inputs(compiled, n_pairs, seed), sample_inputs(compiled, n_pairs, seed + 1)
    mask = torch.ones(x_r.shape, dtype=torch.bool)
    mask[:, 0] = False  # BOS: tracr leaves its output unspecified
    metrics = {"sq": squared_error(mask)}
    if compiled.categorical:
        metrics["mismatch"] = mismatch(mask.double())
    full, informative = circuit_paths(compiled), circuit_paths(compiled, informative=True)
    braces = lambda paths: "{" + ", ".join(paths) + "}"
    table = {"compiled circuit": braces(full), "informative paths": braces(informative),
             "everything but the informative paths": "{...} - " + braces(informative)}
    for p in informative:
        table[f"without {p}"] = braces(q for q in informative if q != p)
    hyps = [graph.hypothesis(h) for h in table.values()]
    d = effects(Patcher(graph, x_r, x_c), [NOTHING] + hyps, metrics)
    rows = {key: {m: summarize(d[m][i], d[m][0], n_boot, seed) for m in metrics} for i, key in enumerate(table, start=1)}
    components = {c.name: [u[0] for u in c.units] for c in compiled.components}
    return {"program": compiled.name, "components": components, "n_circuit_paths": len(full), "informative": informative,
            "rows": rows}

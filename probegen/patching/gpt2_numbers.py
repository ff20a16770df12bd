"""The path patching paper's GPT-2 experiment: "the next token is a number", localised to heads 5.6 and 6.1,
compared with causal tracing and zero ablation.

Behaviour: p_num = the probability GPT-2 gives, at the last position, to the tokens that are numbers (every
vocabulary entry whose text is digits, with or without a leading space). Pairs: a reference prompt after
which a number is likely ("... in the year") and a counterfactual prompt that differs only in its ending
("... in the morning"); both have the same token length (pairs are grouped by length, one engine per
group). d = KL(Bernoulli(p_num(G(x_r))) || Bernoulli(p_num(G_H))), the behaviour as a number / not-number
distribution. This is our operationalisation of the behaviour on templates, not the paper's data set.

Compared, on the same pairs and d:
  path patching   hypotheses: paths through 5.6 and 6.1, each alone, only their direct paths to the logits,
                  and control pairs of other heads of layers 5 and 6 (proportion explained, bootstrap CI)
  causal tracing  for every head and MLP n, the counterfactual run with n's reference output restored, i.e.
                  the hypothesis {... -> n -> ...}: the share of the behaviour that n alone carries
  zero ablation   for every head and MLP n, the reference run with n's output set to zero: the share of the
                  behaviour's effect (d(G(x_r), G_n=0(x_r)) / ATE) that removing n causes

The GPT-2 weights come from a local Hugging Face cache or directory only (nothing is downloaded here).
"""

import dataclasses
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from probegen.config import dataclass_section
from probegen.errors import ProbegenError
from probegen.io import atomic_path, write_json
from probegen.patching.engine import Patcher
from probegen.patching.evaluate import effects, summarize
from probegen.patching.hf import graph_from_hf
from probegen.patching.lm import shared_sum
from probegen.patching.paths import NOTHING

# (reference ending, counterfactual ending): a number is likely after the first, not after the second
ENDINGS = [("in the year", "in the morning"), ("on page", "on top"), ("the score was", "the mood was"),
           ("he was born in", "he was born with"), ("the population was about", "the population was mostly"),
           ("the temperature reached", "the temperature felt"), ("it cost about $", "it cost about the"),
           ("the room number is", "the room color is"), ("they won by", "they won with"),
           ("see chapter", "see below")]
PREFIXES = ["According to the report,", "Yesterday", "As we expected,", "In the end", "She told us that",
            "The article says", "Last week", "Everyone knows that", "By all accounts", "My notes say"]


@dataclass
class NumbersConfig:
    model: str = "gpt2"  # a name in the local Hugging Face cache, or a directory with the weights and tokenizer
    heads: list = field(default_factory=lambda: ["5.6", "6.1"])
    n_controls: int = 8  # control pairs of other heads from the same layers
    n_boot: int = 1000
    seed: int = 0
    chunk: int = 8
    device: str = "cpu"  # cpu | cuda | auto
    n_prefixes: int = len(PREFIXES)  # prompts: the first n prefixes x every ending pair
    threads: int = 0  # torch threads (0 = torch's default); small models on a busy CPU: 1 is far faster

    @classmethod
    def from_params(cls, params):
        cfg = dataclass_section(cls, params, "gpt2_numbers")
        if not cfg.heads or not all(isinstance(h, str) for h in cfg.heads):
            raise ProbegenError(f"params gpt2_numbers.heads: expected a list of head names like '5.6', got {cfg.heads!r}")
        if cfg.device not in ("cpu", "cuda", "auto"):
            raise ProbegenError(f"params gpt2_numbers.device: expected cpu, cuda or auto, got {cfg.device!r}")
        if not 1 <= cfg.n_prefixes <= len(PREFIXES):
            raise ProbegenError(f"params gpt2_numbers.n_prefixes: expected 1 .. {len(PREFIXES)}, got {cfg.n_prefixes}")
        for name in ("n_boot", "chunk"):
            if getattr(cfg, name) < 1:
                raise ProbegenError(f"params gpt2_numbers.{name}: must be >= 1, got {getattr(cfg, name)}")
        return cfg


# ------------------------------------------------------------------------------------------- model, data


def load_gpt2(name_or_path, device="cpu"):
    """(model, tokenizer) from the local Hugging Face cache or a directory; one clear error when absent."""
    try:
        from transformers import AutoTokenizer, GPT2LMHeadModel
    except ImportError:
        raise ProbegenError("gpt2_numbers needs the Hugging Face transformers package: pip install 'probegen[hf]'") from None
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # stderr is for the one-line error of a failed stage
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        model = GPT2LMHeadModel.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        from huggingface_hub.constants import HF_HUB_CACHE
        raise ProbegenError(f"params gpt2_numbers.model: the GPT-2 weights {name_or_path!r} are not in the local Hugging "
                            f"Face cache ({HF_HUB_CACHE}) nor a directory holding them; fetch them once where there is "
                            f"internet (`hf download {name_or_path}`) and copy the cache here") from None
    return model.eval().to(device), tokenizer


def number_token_ids(tokenizer):
    """Ids of the vocabulary entries whose text is a number (ASCII digits, optionally after one space)."""
    ids = [i for i in range(len(tokenizer)) if _is_number(tokenizer.decode([i]))]
    if not ids:
        raise ProbegenError("gpt2_numbers: the tokenizer has no number tokens")
    return torch.tensor(ids)


def _is_number(text):
    text = text[1:] if text.startswith(" ") else text
    return bool(text) and all("0" <= c <= "9" for c in text)


def prompt_pairs(tokenizer, n_prefixes=len(PREFIXES)):
    """{length: (x_r (N, T), x_c (N, T))}: every prefix x ending pair whose two prompts have the same length."""
    groups = {}
    for prefix in PREFIXES[:n_prefixes]:
        for ref_end, cf_end in ENDINGS:
            r, c = (tokenizer(f"{prefix} {end}")["input_ids"] for end in (ref_end, cf_end))
            if len(r) == len(c):
                groups.setdefault(len(r), ([], []))
                groups[len(r)][0].append(r)
                groups[len(r)][1].append(c)
    if not groups:
        raise ProbegenError("gpt2_numbers: no prompt pair has equal token lengths under this tokenizer")
    return {T: (torch.tensor(r), torch.tensor(c)) for T, (r, c) in sorted(groups.items())}


def number_kl(number_ids):
    """d(ref, out) for (B, V) last-position logits: KL between the number / not-number distributions."""
    def p_num(logits):
        return logits.float().softmax(-1)[:, number_ids].sum(-1).clamp(1e-7, 1 - 1e-7)

    def d(ref, out):
        p, q = p_num(ref), p_num(out)
        return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    d.p_num = p_num
    return d


# --------------------------------------------------------------------------------------------- analysis


def hypotheses(graph, heads, n_controls, seed):
    """The path-patching hypothesis table: the heads together, alone, their direct paths, and controls."""
    through = lambda hs: "{" + ", ".join(f"... -> {h} -> ..." for h in hs) + "}"
    direct = lambda hs: "{" + ", ".join(f"... -> {h} -> {graph.output}" for h in hs) + "}"
    table = {f"paths through {' + '.join(heads)}": through(heads)}
    if len(heads) > 1:
        table.update({f"paths through {h}": through([h]) for h in heads})
    table[f"direct paths {' + '.join(heads)} -> logits"] = direct(heads)
    layers = sorted({h.split(".")[0] for h in heads})
    others = [n for n in graph.order if n.split(".")[0] in layers and n.count(".") == 1 and n not in heads]
    rng = random.Random(seed)
    for k in range(min(n_controls, len(others) // max(1, len(heads)))):
        pick = rng.sample(others, len(heads))
        table[f"control {k}: paths through {' + '.join(pick)}"] = through(pick)
    table["all paths"] = "{...}"
    return {name: graph.hypothesis(text) for name, text in table.items()}


def zero_ablation(graph, ref, node):
    """The graph's output with `node`'s value replaced by zeros, from the cached reference values `ref`: only
    the nodes downstream of `node` are recomputed (an ordinary forward, independent of the path engine)."""
    values, sums = dict(ref), {}
    values[node] = torch.zeros_like(ref[node])
    below, todo = set(), [node]
    while todo:  # every node downstream of `node`
        for receiver, _ in graph.receivers(todo.pop()):
            if receiver not in below:
                below.add(receiver)
                todo.append(receiver)
    for name in graph.order:
        if name in below:
            slots = {q: shared_sum(senders, values, sums) for q, senders in graph.slots(name).items()}
            values[name] = graph.call(name, slots)
    return values[graph.output]


def run_gpt2_numbers(cfg, model, tokenizer, metrics_path, plot_path, log=print):
    """The whole experiment on one model; writes the metrics JSON and the plot atomically."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    graph = graph_from_hf(model, logits="last")
    for h in cfg.heads:  # a head the model lacks: one clear error, before any work
        try:
            graph.hypothesis(f"{{... -> {h} -> ...}}")
        except ProbegenError as err:
            raise ProbegenError(f"params gpt2_numbers.heads: {str(err).split(': ', 1)[1]}") from None
    d = number_kl(number_token_ids(tokenizer).to(next(model.parameters()).device))
    table = hypotheses(graph, cfg.heads, cfg.n_controls, cfg.seed)
    nodes = [n for n in graph.order if n != graph.output]
    tracing = {n: graph.hypothesis(f"{{... -> {n} -> ...}}") for n in nodes}
    device = next(model.parameters()).device
    rows, p_ref, p_cf, ablate = [], [], [], []
    hyps = [NOTHING] + list(table.values()) + list(tracing.values())
    with torch.no_grad():
        for T, (x_r, x_c) in prompt_pairs(tokenizer, cfg.n_prefixes).items():
            x_r, x_c = x_r.to(device), x_c.to(device)
            patcher = Patcher(graph, x_r, x_c)
            rows.append(effects(patcher, hyps, d, cfg.chunk))  # (1 + H, B_T)
            ref = patcher.ref[graph.output]
            p_ref.append(d.p_num(ref).cpu().numpy())
            p_cf.append(d.p_num(patcher.cf[graph.output]).cpu().numpy())
            ablate.append(np.stack([d(ref, zero_ablation(graph, patcher.ref, n)).double().cpu().numpy() for n in nodes]))
            if log:
                log(f"gpt2_numbers: {x_r.shape[0]} pairs of length {T} done ({time.time() - t0:.0f}s)")
    values, ablate = np.concatenate(rows, axis=1), np.concatenate(ablate, axis=1)  # (1 + H, N), (nodes, N)
    ate = values[0]
    names = list(table)
    result = {
        "config": dataclasses.asdict(cfg), "n_pairs": int(values.shape[1]),
        "behaviour": {"p_number_reference": float(np.concatenate(p_ref).mean()),
                      "p_number_counterfactual": float(np.concatenate(p_cf).mean()), "ate_kl": float(ate.mean())},
        "hypotheses": {n: {"hypothesis": str(table[n]), **summarize(values[1 + i], ate, cfg.n_boot, cfg.seed)}
                       for i, n in enumerate(names)},
        "causal_tracing": {n: _ratio(1 - values[1 + len(names) + i].mean() / ate.mean()) for i, n in enumerate(nodes)},
        "zero_ablation": {n: _ratio(ablate[i].mean() / ate.mean()) for i, n in enumerate(nodes)},
    }
    result["top"] = {m: sorted(result[m], key=lambda n: -(result[m][n] or 0))[:10] for m in ("causal_tracing", "zero_ablation")}
    plot_gpt2_numbers(result, graph.spec.n_layers, graph.spec.n_heads, plot_path)
    write_json(metrics_path, result)
    return result


def _ratio(x):
    return None if not np.isfinite(x) else float(x)


def plot_gpt2_numbers(result, n_layers, n_heads, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    rows = result["hypotheses"]
    names = list(rows)
    vals = np.array([rows[n]["explained"] if rows[n]["explained"] is not None else np.nan for n in names])
    ci = np.array([rows[n]["explained_ci"] or [np.nan, np.nan] for n in names])
    axes[0].barh(np.arange(len(names)), vals, xerr=np.abs(ci.T - vals), capsize=2, color="tab:blue")
    axes[0].set_yticks(np.arange(len(names)), names, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("proportion explained (95% CI)")
    axes[0].set_title("path patching")
    for ax, key, title in ((axes[1], "causal_tracing", "causal tracing: restored share"),
                           (axes[2], "zero_ablation", "zero ablation: share of effect")):
        grid = np.full((n_layers, n_heads + 1), np.nan)  # last column: the layer's MLP
        for name, v in result[key].items():
            if v is None:
                continue
            if name.count(".") == 1:
                layer, head = map(int, name.split("."))
                grid[layer, head] = v
            elif name.endswith(".mlp"):
                grid[int(name.split(".")[1]), n_heads] = v
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xlabel(f"head (column {n_heads}: MLP)")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    b = result["behaviour"]
    fig.suptitle(f"'next token is a number': p_num {b['p_number_reference']:.3f} (reference) vs "
                 f"{b['p_number_counterfactual']:.3f} (counterfactual), {result['n_pairs']} pairs")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

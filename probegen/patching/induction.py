"""Induction analysis: train tiny attention-only transformers on [filler, S, S], find the previous-token and
induction heads by their attention, and test path-patching hypotheses about the induction behaviour.

Behaviour = predicting the repeated tokens: positions t in the second copy of S (except the last), whose
next token is determined by the first copy. Pairs: x_r and x_c are independent sequences; d is the loss
increase on x_r's repeated positions (primary, "% loss explained" as in the paper) and the KL divergence.
Greedy refinement picks paths on a separate set of "fit" pairs, so the reported numbers are held out.
"""

import dataclasses
import math
import multiprocessing
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from probegen.config import dataclass_section
from probegen.errors import ProbegenError
from probegen.io import atomic_path, write_json
from probegen.patching.engine import Patcher
from probegen.patching.evaluate import bootstrap, effects, kl, loss_increase, summarize
from probegen.patching.paths import NOTHING, all_paths, parse_hypothesis
from probegen.patching.transformer import AttnOnlyTransformer, TransformerConfig


@dataclass
class InductionConfig:
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    steps: int = 6000  # induction forms after ~4-5k steps (seeds 0, 1 of a pilot: 3.8k, 4.8k)
    batch_size: int = 64
    lr: float = 1e-3
    vocab: int = 64
    seq_len: int = 40
    d_model: int = 64
    n_heads: int = 4
    d_head: int = 16
    min_len: int = 8  # |S| ~ U[min_len, max_len]
    max_len: int = 16
    n_pairs: int = 512  # held-out (x_r, x_c) pairs for the table
    n_fit_pairs: int = 256  # pairs on which greedy refinement chooses paths
    greedy_rounds: int = 3
    metric: str = "loss"  # what greedy refinement maximises: "loss" or "kl"
    n_boot: int = 1000
    threads: int = 1  # torch threads (0 = torch's default); tiny ops: 2 threads were 10x slower on a busy box
    workers: int = 2  # seeds analysed in parallel processes (one per core); results do not depend on it

    @classmethod
    def from_params(cls, params):
        """A dict from params.yaml -> config, rejecting unknown keys and wrong types with one clear line."""
        cfg = dataclass_section(cls, params, "induction")
        cfg.check()
        return cfg

    def check(self):
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise ProbegenError(f"params induction.seeds: expected a non-empty list of ints, got {self.seeds!r}")
        if not 2 <= self.min_len <= self.max_len or 2 * self.max_len > self.seq_len:
            raise ProbegenError(f"params induction.min_len/max_len: need 2 <= min_len <= max_len and 2 * max_len <= "
                                f"seq_len, got {self.min_len}, {self.max_len}, seq_len {self.seq_len}")
        if self.metric not in ("loss", "kl"):
            raise ProbegenError(f"params induction.metric: expected 'loss' or 'kl', got {self.metric!r}")
        for name in ("steps", "batch_size", "vocab", "d_model", "n_heads", "d_head", "n_pairs", "n_fit_pairs", "n_boot"):
            if getattr(self, name) < 1:
                raise ProbegenError(f"params induction.{name}: must be >= 1, got {getattr(self, name)}")

    def model_config(self):
        return TransformerConfig(vocab=self.vocab, seq_len=self.seq_len, d_model=self.d_model, n_layers=2,
                                 n_heads=self.n_heads, d_head=self.d_head)


# ------------------------------------------------------------------------------------------------- data


def sample_batch(n, cfg, gen):
    """n sequences [filler, S, S] -> tokens (n, T), target (n, T) = next token, mask (n, T) = the next token is
    a repeat (t in the second S, t < T-1), lengths (n,) = |S|."""
    T, V = cfg.seq_len, cfg.vocab
    toks = torch.randint(0, V, (n, T), generator=gen)  # filler
    L = torch.randint(cfg.min_len, cfg.max_len + 1, (n, 1), generator=gen)
    S = torch.randint(0, V, (n, cfg.max_len), generator=gen)
    pos = torch.arange(T)
    start1, start2 = T - 2 * L, T - L
    first, second = (pos >= start1) & (pos < start2), pos >= start2
    toks = torch.where(first, S.gather(1, (pos - start1).clamp(0, cfg.max_len - 1)), toks)
    toks = torch.where(second, S.gather(1, (pos - start2).clamp(0, cfg.max_len - 1)), toks)
    target = torch.cat([toks[:, 1:], torch.zeros(n, 1, dtype=toks.dtype)], 1)
    mask = second & (pos < T - 1)
    return toks, target, mask, L[:, 0]


# --------------------------------------------------------------------------------------------- training


def train(cfg, seed, log=None):
    """Train one model (next-token loss on every position) -> (model, record)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    model = AttnOnlyTransformer(cfg.model_config())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    t0, recent = time.time(), deque(maxlen=100)  # recent losses, for the log
    for step in range(1, cfg.steps + 1):
        toks, _, _, _ = sample_batch(cfg.batch_size, cfg, gen)
        logits = model(toks)[:, :-1]  # (B, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), toks[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent.append(loss.item())
        if log and (step % 500 == 0 or step == cfg.steps):
            log(f"seed {seed} step {step}/{cfg.steps} loss {np.mean(recent):.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    return model, {"steps": cfg.steps, "final_loss": float(np.mean(recent))}  # no timings: same inputs, same bytes


def repeated_token_stats(model, toks, target, mask):
    with torch.no_grad():
        logits = model(toks)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
    acc = (logits.argmax(-1) == target).float()
    return {"repeated_loss": float(loss[mask].mean()), "repeated_acc": float(acc[mask].mean()),
            "uniform_loss": math.log(model.cfg.vocab)}


# ---------------------------------------------------------------------------------------------- heads


def head_scores(model, toks, lengths, mask):
    """Previous-token score of each layer-0 head (mean attention from t to t-1) and induction score of each
    layer-1 head (mean attention from a repeated position t to t - |S| + 1, the token after the earlier copy)."""
    with torch.no_grad():
        _, (a0, a1) = model(toks, return_patterns=True)  # (B, H, T, T) each
    B, H, T, _ = a0.shape
    t = torch.arange(1, T)
    prev = a0[:, :, t, t - 1].mean((0, 2))  # (H,)
    b, tt = mask.nonzero(as_tuple=True)
    src = tt - lengths[b] + 1
    ind = a1[b, :, tt, src].mean(0)  # (H,)
    return {f"0.{h}": float(prev[h]) for h in range(H)}, {f"1.{h}": float(ind[h]) for h in range(H)}, (a0, a1)


def pick_heads(scores, frac=0.5):
    """Heads scoring at least `frac` of the best score, best first."""
    best = max(scores.values())
    return [h for h, s in sorted(scores.items(), key=lambda kv: -kv[1]) if s >= frac * best]


def induction_hypotheses(graph, prev, ind, wrong, n_heads):
    """The hypothesis table: the induction hypothesis, its two controls, and coarser references.
    `ind` lists every induction head, best first; the paper's form names one head, so that is a row too."""
    qv = lambda heads: [f"emb -> {i}.{slot} -> out" for i in heads for slot in ("q", "v")]
    via_prev = lambda heads: [f"emb -> {p} -> {i}.k -> out" for i in heads for p in prev]
    table = {"induction": qv(ind) + via_prev(ind)}
    if len(ind) > 1:
        table["induction, top head only"] = qv(ind[:1]) + via_prev(ind[:1])
    table["control: K from emb"] = qv(ind) + [f"emb -> {i}.k -> out" for i in ind]
    if wrong is not None:
        table["control: K via wrong head"] = qv(ind) + [f"emb -> {wrong} -> {i}.k -> out" for i in ind]
    table["all paths via induction heads"] = [f"... -> {i} -> ..." for i in ind]
    table["all paths via layer 1"] = [f"... -> 1.{h} -> ..." for h in range(n_heads)]
    table["direct emb -> out"] = ["emb -> out"]
    return {name: parse_hypothesis(graph, paths) for name, paths in table.items()}


def greedy_refine(patcher, start, d, rounds, log=None):
    """Add, `rounds` times, the single concrete path that most lowers AUE (raises the proportion explained).
    Returns the hypothesis after each round and a record of the added paths."""
    graph, hyp, hyps, steps = patcher.graph, start, [], []
    ate = float(effects(patcher, [NOTHING], d)[0].mean())
    for r in range(rounds):
        candidates = [p for p in all_paths(graph) if not hyp.contains(p)]
        if not candidates:
            break
        aue = effects(patcher, [hyp.union(p) for p in candidates], d).mean(1)  # (C,)
        best = int(np.argmin(aue))
        hyp = hyp.union(candidates[best])
        hyps.append(hyp)
        steps.append({"added": str(candidates[best]), "explained_fit": 1 - float(aue[best]) / ate})
        if log:
            log(f"  greedy round {r + 1}: + {candidates[best]} -> {steps[-1]['explained_fit']:.3f} (fit pairs)")
    return hyps, steps


# -------------------------------------------------------------------------------------------- analysis


def analyse_seed(cfg, seed, log=None):
    """Train, locate heads, score the hypothesis table. Returns (result, bootstrap draws, plot example)."""
    model, record = train(cfg, seed, log)
    gen = torch.Generator().manual_seed(20_000 + seed)
    toks, target, mask, lengths = sample_batch(cfg.n_pairs, cfg, gen)  # x_r
    toks_c = sample_batch(cfg.n_pairs, cfg, gen)[0]  # x_c: independent sequences
    fit_r, fit_target, fit_mask, _ = sample_batch(cfg.n_fit_pairs, cfg, gen)
    fit_c = sample_batch(cfg.n_fit_pairs, cfg, gen)[0]
    record.update(repeated_token_stats(model, toks, target, mask))

    prev_scores, ind_scores, (a0, a1) = head_scores(model, toks, lengths, mask)
    prev, ind = pick_heads(prev_scores), pick_heads(ind_scores)
    others = [h for h in prev_scores if h not in prev]
    wrong = min(others, key=prev_scores.get) if others else None  # the least previous-token-like head
    graph = model.patch_graph()
    table = induction_hypotheses(graph, prev, ind, wrong, cfg.n_heads)

    fit_d = loss_increase(fit_target, mask=fit_mask) if cfg.metric == "loss" else kl(fit_mask)
    refined, greedy = greedy_refine(Patcher(graph, fit_r, fit_c), table["induction"], fit_d, cfg.greedy_rounds, log)
    for k, hyp in enumerate(refined, start=1):
        table[f"induction + {k} greedy path{'s' * (k > 1)}"] = hyp

    rows, draws = score_table(graph, table, toks, toks_c, target, mask, cfg.n_boot, seed)
    if log:
        for name, r in rows.items():
            log(f"  seed {seed} {name:34s} loss {_fmt(r['loss'])}  kl {_fmt(r['kl'])}")
    result = {"train": record, "heads": {"prev_token_scores": prev_scores, "induction_scores": ind_scores,
                                         "prev_token": prev, "induction": ind, "wrong": wrong},
              "hypotheses": rows, "greedy": greedy}
    example = {"tokens": toks[0].tolist(), "len": int(lengths[0]), "prev_name": prev[0], "ind_name": ind[0],
               "prev": a0[0, int(prev[0].split(".")[1])].numpy(), "ind": a1[0, int(ind[0].split(".")[1])].numpy()}
    return result, draws, example


def score_table(graph, table, x_r, x_c, target, mask, n_boot, seed):
    """Both metrics for every hypothesis on held-out pairs -> ({name: row}, {(name, metric): draws})."""
    metrics = {"loss": loss_increase(target, mask=mask), "kl": kl(mask)}
    names = list(table)
    d = effects(Patcher(graph, x_r, x_c), [NOTHING] + [table[n] for n in names], metrics)  # {m: (1 + H, B)}
    rows, draws = {}, {}
    for i, name in enumerate(names, start=1):
        rows[name] = {"hypothesis": str(table[name])}
        for m in metrics:
            rows[name][m] = summarize(d[m][i], d[m][0], n_boot, seed)
            aue_b, ate_b = bootstrap(d[m][i], d[m][0], n_boot, seed)
            draws[(name, m)] = 1 - aue_b / ate_b
    return rows, draws


def _fmt(row):
    if row["explained"] is None:
        return "  n/a"
    lo, hi = row["explained_ci"]
    return f"{row['explained']:.3f} [{lo:.3f}, {hi:.3f}]"


def summarize_seeds(per_seed, draws):
    """Mean over seeds of each hypothesis' proportion explained, with a bootstrap CI (per-seed pair
    resamples averaged draw by draw) and the spread over seeds."""
    names = list(dict.fromkeys(n for s in per_seed.values() for n in s["hypotheses"]))  # ordered union
    out = {}
    for name in names:
        out[name] = {}
        for m in ("loss", "kl"):
            vals = [s["hypotheses"][name][m]["explained"] for s in per_seed.values()
                    if name in s["hypotheses"]]
            stack = [dr[(name, m)] for dr in draws if (name, m) in dr]
            if len(vals) < len(per_seed) or any(v is None for v in vals):
                out[name][m] = None  # not defined for every seed (e.g. no wrong head)
                continue
            mean_draws = np.mean(stack, axis=0)
            out[name][m] = {"explained": float(np.mean(vals)), "std": float(np.std(vals)),
                            "explained_ci": np.percentile(mean_draws, [2.5, 97.5]).tolist()}
    return out


def _analyse_seed_in_worker(cfg, seed, log=print):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return analyse_seed(cfg, seed, log)


def _analyse_seeds(cfg, log):
    """analyse_seed for every seed, in `workers` spawned processes when there are several seeds."""
    workers = min(cfg.workers, len(cfg.seeds))
    if workers <= 1:
        return [_analyse_seed_in_worker(cfg, seed, log) for seed in cfg.seeds]
    # spawn, not fork: forking a process whose OpenMP pool is running can deadlock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_analyse_seed_in_worker, [cfg] * len(cfg.seeds), cfg.seeds))


def run_induction(cfg, metrics_path, plot_path, log=print):
    """The whole analysis: every seed, the seed mean, metrics JSON and the plot, written atomically."""
    t0 = time.time()
    per_seed, draws, examples = {}, [], []
    for seed, (result, dr, example) in zip(cfg.seeds, _analyse_seeds(cfg, log)):
        per_seed[str(seed)] = result
        draws.append(dr)
        examples.append(example)
    summary = {"config": dataclasses.asdict(cfg), "seeds": per_seed, "mean": summarize_seeds(per_seed, draws)}
    plot_induction(summary, examples[0], plot_path)
    write_json(metrics_path, summary)
    if log:
        log(f"induction: {len(cfg.seeds)} seeds in {time.time() - t0:.0f}s")
    return summary


# -------------------------------------------------------------------------------------------------- plot


def _explained(seed_result, name, metric):
    row = seed_result["hypotheses"].get(name)
    return np.nan if row is None or row[metric]["explained"] is None else row[metric]["explained"]


def plot_induction(summary, example, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = summary["mean"]
    names = list(mean)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax = axes[0]
    y = np.arange(len(names))
    for k, (m, color) in enumerate((("loss", "tab:blue"), ("kl", "tab:orange"))):
        # undefined entries (no effect to explain, or missing for a seed) are left out as NaN
        vals = np.array([mean[n][m]["explained"] if mean[n][m] else np.nan for n in names])
        ci = np.array([mean[n][m]["explained_ci"] if mean[n][m] else [np.nan, np.nan] for n in names])
        ax.barh(y + (k - 0.5) * 0.38, vals, height=0.36, color=color, label=f"d = {m}",
                xerr=np.abs(ci.T - vals), capsize=2)
        for s in summary["seeds"].values():  # per-seed dots
            pts = [_explained(s, n, m) for n in names]
            ax.plot(pts, y + (k - 0.5) * 0.38, "k.", ms=3)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.axvline(1, color="k", lw=0.5, ls=":")
    ax.set_xlabel(f"proportion explained (mean of {len(summary['seeds'])} seeds, 95% bootstrap CI; dots = seeds)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    for ax, key, title in ((axes[1], "prev", "previous-token head"), (axes[2], "ind", "induction head")):
        ax.imshow(example[key], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{title} {example[key + '_name']} (seed {next(iter(summary['seeds']))})")
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        start2 = len(example["tokens"]) - example["len"]
        ax.axhline(start2 - 0.5, color="w", lw=0.5)
        ax.axvline(start2 - example["len"] - 0.5, color="w", lw=0.5)
    fig.suptitle("Path patching of induction in 2-layer attention-only transformers")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

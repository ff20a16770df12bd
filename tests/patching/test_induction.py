"""Ground truth by construction: a hand-wired previous-token head + induction head, and the analysis stage."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probegen.errors import ProbegenError
from probegen.patching import evaluate, kl, loss_increase
from probegen.patching.induction import (InductionConfig, head_scores, induction_hypotheses, pick_heads,
                                         run_induction, sample_batch)
from probegen.patching.transformer import induction_by_construction

ROOT = Path(__file__).resolve().parents[2]
SMALL = InductionConfig(vocab=32, seq_len=24, min_len=4, max_len=8)


def test_sample_batch_repeats_s_and_masks_the_repeated_predictions():
    toks, target, mask, L = sample_batch(32, InductionConfig(), torch.Generator().manual_seed(0))
    T = toks.shape[1]
    assert toks.shape == (32, 40) and ((L >= 8) & (L <= 16)).all()
    for b in range(32):
        n = int(L[b])
        assert torch.equal(toks[b, T - n:], toks[b, T - 2 * n:T - n])
        assert mask[b].sum() == n - 1 and mask[b, T - n:T - 1].all()
    assert torch.equal(target[:, :-1], toks[:, 1:])


@pytest.fixture(scope="module")
def constructed():
    model = induction_by_construction(vocab=SMALL.vocab, seq_len=SMALL.seq_len)
    gen = torch.Generator().manual_seed(0)
    x_r, target, mask, lengths = sample_batch(256, SMALL, gen)
    x_c = sample_batch(256, SMALL, gen)[0]
    return model, x_r, x_c, target, mask, lengths


def test_constructed_model_does_induction_with_the_wired_heads(constructed):
    model, x_r, _, target, mask, lengths = constructed
    correct = model(x_r).argmax(-1) == target
    # where the current token occurred exactly once before (in the first copy of S), induction is unambiguous
    earlier = (x_r[:, :, None] == x_r[:, None, :]).tril(-1).sum(-1)  # (B, T): earlier occurrences of x_t
    unique = mask & (earlier == 1)
    assert unique.sum() > 300 and correct[unique].all()
    assert correct[mask].float().mean() > 0.6  # elsewhere attention splits between earlier occurrences
    prev, ind, _ = head_scores(model, x_r, lengths, mask)
    assert prev["0.0"] > 0.99 and prev["0.1"] < 0.2 and ind["1.1"] > 0.7 and ind["1.0"] < 0.2
    assert pick_heads(prev) == ["0.0"] and pick_heads(ind) == ["1.1"]


@pytest.mark.parametrize("metric", ["loss", "kl"])
def test_induction_hypothesis_explains_the_constructed_model(constructed, metric):
    model, x_r, x_c, target, mask, _ = constructed
    g = model.patch_graph()
    table = induction_hypotheses(g, ["0.0"], ["1.1"], "0.1", n_heads=2)
    d = loss_increase(target, mask=mask) if metric == "loss" else kl(mask)
    rows = {name: r for name, r in zip(table, evaluate(g, list(table.values()), x_r, x_c, metric=d, n_boot=200))}
    assert rows["induction"]["explained"] > 0.99
    assert rows["induction"]["explained_ci"][0] > 0.98
    assert rows["all paths via induction heads"]["explained"] > 0.99
    # Controls keep Q and V from x_r, so attention lands on x_r's own tokens and recovers part of the
    # behaviour (0.37 here), but far from all of it; the direct path carries nothing (W_U reads only 1.1).
    for control in ("control: K from emb", "control: K via wrong head"):
        assert 0.2 < rows[control]["explained"] < 0.5 and rows[control]["explained_ci"][1] < 0.5, control
    assert rows["direct emb -> out"]["explained"] == 0.0


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ProbegenError, match="params induction.stpes: unknown key"):
        InductionConfig.from_params({"stpes": 10})
    with pytest.raises(ProbegenError, match="params induction.steps: expected int, got '10'"):
        InductionConfig.from_params({"steps": "10"})
    with pytest.raises(ProbegenError, match="2 \\* max_len <= seq_len"):
        InductionConfig.from_params({"max_len": 30})
    assert InductionConfig.from_params({"lr": 1, "seeds": [3]}).seeds == [3]


def test_run_induction_tiny_writes_metrics_and_plot(tmp_path):
    cfg = InductionConfig(seeds=[0, 1], steps=20, n_pairs=24, n_fit_pairs=16, greedy_rounds=1, n_boot=50,
                          vocab=16, seq_len=20, min_len=4, max_len=8)
    summary = run_induction(cfg, tmp_path / "m" / "induction.json", tmp_path / "p" / "induction.png", log=None)
    saved = json.loads((tmp_path / "m" / "induction.json").read_text())
    assert (tmp_path / "p" / "induction.png").read_bytes()[:4] == b"\x89PNG"
    assert set(saved["seeds"]) == {"0", "1"} and saved["config"]["steps"] == 20
    seed0 = saved["seeds"]["0"]
    assert {"induction", "control: K from emb", "induction + 1 greedy path"} <= set(seed0["hypotheses"])
    assert set(seed0["hypotheses"]["induction"]) == {"hypothesis", "loss", "kl"}
    assert len(seed0["greedy"]) == 1 and " -> " in seed0["greedy"][0]["added"]
    kl_mean = saved["mean"]["induction"]["kl"]
    vals = [saved["seeds"][s]["hypotheses"]["induction"]["kl"]["explained"] for s in ("0", "1")]
    assert kl_mean["explained"] == pytest.approx(sum(vals) / 2)
    assert summary["mean"] == saved["mean"]
    assert not list(tmp_path.glob("**/*.tmp"))


def test_stage_reports_bad_params_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("induction:\n  stpes: 3\n")
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "induction.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: params induction.stpes: unknown key")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "metrics").exists()

"""The gpt2_numbers experiment end to end on a random-weight GPT-2 saved to a directory with a word-level
tokenizer (the numbers mean nothing; the outputs must be complete and well-formed), and its errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (pip install 'probegen[hf]') is not installed")
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from tokenizers.pre_tokenizers import Whitespace  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from probegen.errors import ProbegenError  # noqa: E402
from probegen.patching.gpt2_numbers import (ENDINGS, PREFIXES, NumbersConfig, number_token_ids,  # noqa: E402
                                            prompt_pairs)

ROOT = Path(__file__).resolve().parents[2]


def word_tokenizer():
    words = {"[UNK]", "1990", "5", "12", "300", " 7"}
    pre = Whitespace()
    for text in PREFIXES + [e for pair in ENDINGS for e in pair]:
        words |= {w for w, _ in pre.pre_tokenize_str(text)}
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(sorted(words))}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A random 7-layer, 7-head GPT-2 (so that heads 5.6 and 6.1 exist) and its tokenizer, saved as a user would."""
    path = tmp_path_factory.mktemp("gpt2-tiny")
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=7, n_head=7, n_embd=28, vocab_size=len(tokenizer), n_positions=32, bos_token_id=0,
                     eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_stage(folder, params, env=None):
    """The stage as its nested DVC project runs it: from the project root, on a folder of params and outputs."""
    (folder / "params.yaml").write_text(json.dumps({"gpt2_numbers": params}))  # JSON is YAML
    return subprocess.run([sys.executable, "-m", "stages.gpt2_numbers", str(folder)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


def test_prompts_and_number_tokens():
    tokenizer = word_tokenizer()
    groups = prompt_pairs(tokenizer)
    assert sum(len(r) for r, _ in groups.values()) == len(PREFIXES) * len(ENDINGS)  # word-level: all pairs align
    for T, (x_r, x_c) in groups.items():
        assert x_r.shape == x_c.shape and x_r.shape[1] == T
        assert (x_r[:, :-1] != x_c[:, :-1]).any() or (x_r[:, -1] != x_c[:, -1]).any()
    numbers = {tokenizer.decode([int(i)]) for i in number_token_ids(tokenizer)}
    assert numbers == {"1990", "5", "12", "300", " 7"}


def test_stage_runs_end_to_end_on_a_random_gpt2(tmp_path, tiny_gpt2_dir):
    proc = run_stage(tmp_path, {"model": str(tiny_gpt2_dir), "n_boot": 50, "n_controls": 2, "n_prefixes": 2,
                                "threads": 1})
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "metrics" / "gpt2_numbers.json").read_text())
    assert (tmp_path / "plots" / "gpt2_numbers.png").read_bytes()[:4] == b"\x89PNG"
    assert result["n_pairs"] == 2 * len(ENDINGS) and result["config"]["n_prefixes"] == 2
    b = result["behaviour"]
    assert 0 < b["p_number_reference"] < 1 and 0 < b["p_number_counterfactual"] < 1 and b["ate_kl"] > 0
    rows = result["hypotheses"]
    assert {"paths through 5.6 + 6.1", "paths through 5.6", "paths through 6.1", "direct paths 5.6 + 6.1 -> logits",
            "all paths"} <= set(rows)
    assert sum(k.startswith("control ") for k in rows) == 2
    assert rows["all paths"]["explained"] == pytest.approx(1.0, abs=1e-6) and rows["all paths"]["aue"] < 1e-9
    for row in rows.values():
        assert set(row) == {"hypothesis", "aue", "ate", "aue_ci", "explained", "explained_ci"}
        lo, hi = row["explained_ci"]
        assert lo <= row["explained"] + 1e-9 and row["explained"] <= hi + 1e-9
    nodes = {f"{l}.{h}" for l in range(7) for h in range(7)} | {f"h.{l}.mlp" for l in range(7)}
    for method in ("causal_tracing", "zero_ablation"):
        assert set(result[method]) == nodes
        assert all(v is not None and abs(v) < 1e6 for v in result[method].values())
        assert len(result["top"][method]) == 10 and set(result["top"][method]) <= nodes
    assert result["causal_tracing"]["5.6"] == pytest.approx(rows["paths through 5.6"]["explained"], abs=1e-9)


def test_missing_weights_are_one_clear_error(tmp_path):
    empty = tmp_path / "hf-home"
    empty.mkdir()
    proc = run_stage(tmp_path, {"model": "gpt2"}, env={"HF_HOME": str(empty), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: params gpt2_numbers.model: the GPT-2 weights 'gpt2' are not in the local Hugging Face cache")
    assert not (tmp_path / "metrics").exists()


def test_bad_params_and_heads_are_one_clear_error(tmp_path, tiny_gpt2_dir):
    with pytest.raises(ProbegenError, match="params gpt2_numbers.hedas: unknown key"):
        NumbersConfig.from_params({"hedas": ["5.6"]})
    proc = run_stage(tmp_path, {"model": str(tiny_gpt2_dir), "heads": ["5.6", "6.9"]})
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: params gpt2_numbers.heads: head '6.9' is not in the model: 7 layers x 7 heads")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_its_nested_dvc_project_runs_and_the_main_pipeline_does_not_see_it(tmp_path, tiny_gpt2_dir):
    from conftest import make_project, run, tiny_params

    repo = make_project(tmp_path / "repo", tiny_params())
    folder = repo / "stages/gpt2_numbers"
    assert (folder / ".dvc").is_dir() and (folder / "dvc.yaml").exists()
    params = {"model": str(tiny_gpt2_dir), "n_boot": 20, "n_controls": 1, "n_prefixes": 1, "threads": 1}
    (folder / "params.yaml").write_text(json.dumps({"gpt2_numbers": params}))
    run("git add -A && git commit -qm gpt2", repo)
    assert not any("gpt2" in s for s in json.loads(run("dvc status --json", repo).stdout))
    run("dvc repro", folder)
    assert json.loads((folder / "metrics/gpt2_numbers.json").read_text())["n_pairs"] > 0
    assert json.loads(run("dvc status --json", folder).stdout) == {}

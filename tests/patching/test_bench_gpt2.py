"""bench_gpt2 (the GPT-2-scale benchmark) on a tiny GPT-2: both methods run, report rates and memory, and agree."""

import pytest

pytest.importorskip("transformers", reason="the hf extra (pip install 'probegen[hf]') is not installed")

from probegen.patching.bench import bench_gpt2  # noqa: E402


def test_bench_gpt2_tiny_in_process():
    out = bench_gpt2(seq=6, pairs=2, n_edge=3, n_multi=3, isolate=False,
                     size=dict(n_layer=2, n_head=2, n_embd=16, vocab_size=30, bos_token_id=0, eos_token_id=0))
    assert (out["gpt2_layers"], out["gpt2_heads"], out["gpt2_seq"]) == (2, 2, 6)
    for kind in ("edge", "multi"):
        for method in ("engine", "hooks"):
            assert out[f"gpt2_{kind}_{method}_hyps_per_s"] > 0
        assert out[f"gpt2_{kind}_max_abs_diff"] <= 1e-5  # the engine and the hooked forwards score alike
    assert out["gpt2_engine_peak_mem_mb"] > 0 and out["gpt2_multi_mean_paths"] >= 1


def test_bench_gpt2_interleaved_tiny():
    from probegen.patching.bench import bench_gpt2_interleaved
    out = bench_gpt2_interleaved(seq=6, pairs=2, n_edge=2, n_multi=2,
                                 size=dict(n_layer=2, n_head=2, n_embd=16, vocab_size=30, bos_token_id=0, eos_token_id=0))
    for kind in ("edge", "multi"):
        assert out[f"gpt2_{kind}_engine_hyps_per_s"] > 0 and out[f"gpt2_{kind}_hooks_hyps_per_s"] > 0
        assert out[f"gpt2_{kind}_max_abs_diff"] <= 1e-5

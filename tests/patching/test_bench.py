"""bench_patching runs, reports positive rates, and its engines agree."""

from probegen.patching.bench import bench_patching


def test_bench_patching_small():
    out = bench_patching(n_hyps=6, n_brute=2, n_pairs=4)
    assert out["patching_paths"] == 169
    for name in ("random", "greedy"):
        for engine in ("fast_batched", "fast_single", "brute_force"):
            assert out[f"patching_{name}_{engine}_hyps_per_s"] > 0
        assert out[f"patching_{name}_max_abs_diff"] <= 1e-5

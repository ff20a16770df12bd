import numpy as np
import pytest

from probegen.errors import ProbegenError
from probegen.zoo.packed import PackedWriter, load_packed

SPEC = {"family": "siren", "task": "classification", "num_classes": 10, "format": "test"}


def write(out, rows, labels, nonfinite="error", capacity=None):
    with PackedWriter(out, capacity=capacity or len(rows), dim=5, spec=SPEC, nonfinite=nonfinite) as w:
        for start in range(0, len(rows), 2):  # chunks of 2: streaming must not change the result
            chunk = slice(start, start + 2)
            ids = range(start, start + len(rows[chunk]))
            w.add(rows[chunk], labels[chunk], [{"k": i} for i in ids], [{"width": 5} for _ in ids],
                  [f"m{i}.pth" for i in ids])


def test_round_trip_streams_chunks_and_memory_maps(tmp_path):
    rows = np.arange(25, dtype=np.float32).reshape(5, 5)
    write(tmp_path / "zoo", rows, np.array([1, 2, 3, 4, 5]))
    zoo = load_packed(tmp_path / "zoo")
    assert isinstance(zoo.weights, np.memmap)
    np.testing.assert_array_equal(zoo.weights, rows)
    assert zoo.labels.dtype == np.int64 and list(zoo.labels) == [1, 2, 3, 4, 5]
    assert list(zoo.meta["id"]) == [f"m{i}.pth" for i in range(5)] and list(zoo.meta["k"]) == list(range(5))
    assert zoo.spec["num_models"] == 5 and zoo.spec["dropped_nonfinite"] == 0


def test_nonfinite_rows_are_dropped_with_a_count(tmp_path):
    rows = np.ones((5, 5), dtype=np.float32)
    rows[1, 3] = np.nan
    rows[4, 0] = np.inf
    rows[2] = 7
    write(tmp_path / "zoo", rows, np.arange(5), nonfinite="drop")
    zoo = load_packed(tmp_path / "zoo")
    assert zoo.spec["dropped_nonfinite"] == 2
    assert list(zoo.meta["id"]) == ["m0.pth", "m2.pth", "m3.pth"]
    np.testing.assert_array_equal(zoo.weights[1], 7)  # rows after a drop stay aligned with their labels
    assert list(zoo.labels) == [0, 2, 3]


def test_nonfinite_error_names_the_model_and_leaves_no_folder(tmp_path):
    rows = np.ones((4, 5), dtype=np.float32)
    rows[3, 0] = np.nan
    with pytest.raises(ProbegenError, match=r"m3.pth: non-finite"):
        write(tmp_path / "zoo", rows, np.arange(4))
    assert list(tmp_path.iterdir()) == []


def test_existing_zoo_survives_a_failed_repack(tmp_path):
    good = np.ones((2, 5), dtype=np.float32)
    write(tmp_path / "zoo", good, np.arange(2))
    bad = good.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ProbegenError):
        write(tmp_path / "zoo", bad, np.arange(2))
    np.testing.assert_array_equal(load_packed(tmp_path / "zoo").weights, good)


def test_heterogeneous_rows_are_zero_padded_and_archs_deduplicated(tmp_path):
    rows = [np.ones(3, np.float32), np.ones(5, np.float32), np.ones(3, np.float32)]
    with PackedWriter(tmp_path / "zoo", capacity=3, dim=5, spec=SPEC) as w:
        for i, r in enumerate(rows):
            w.add(r[None], [i], [{}], [{"width": len(r)}], [f"m{i}"])
    zoo = load_packed(tmp_path / "zoo")
    np.testing.assert_array_equal(zoo.weights[0], [1, 1, 1, 0, 0])
    assert zoo.archs == [{"width": 3}, {"width": 5}] and list(zoo.arch_ids) == [0, 1, 0]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ProbegenError, match=r"weights.npy: missing"):
        load_packed(tmp_path)

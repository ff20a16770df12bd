import os
import stat

import numpy as np
import pytest
import torch

from probegen.errors import ProbegenError
from probegen.zoo.packed import PackedWriter, ZooRows, _truncate, load_packed, ragged
from fake_zoo import register_tiny

SPEC = {"family": "tiny_mlp", "task": "classification", "num_classes": 10, "format": "test"}
ARCH5 = {"in": 1, "hidden": 2, "out": 1}  # 1*2 + 2 + 2*1 + 1 = 7 parameters
D5 = 7


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    register_tiny(monkeypatch)


def write(out, rows, labels, nonfinite="error", capacity=None):
    n = capacity or len(rows)
    with PackedWriter(out, capacity=n, total_params=n * D5, spec=SPEC, nonfinite=nonfinite) as w:
        for start in range(0, len(rows), 2):  # chunks of 2: streaming must not change the result
            chunk = slice(start, start + 2)
            ids = range(start, start + len(rows[chunk]))
            w.add(rows[chunk], labels[chunk], [{"k": i} for i in ids], [ARCH5 for _ in ids],
                  [f"m{i}.pth" for i in ids])


def test_round_trip_streams_chunks_and_memory_maps(tmp_path):
    rows = np.arange(35, dtype=np.float32).reshape(5, D5)
    write(tmp_path / "zoo", rows, np.array([1, 2, 3, 4, 5]), capacity=7)  # trimmed to what was written
    zoo = load_packed(tmp_path / "zoo")
    assert isinstance(np.load(tmp_path / "zoo" / "weights.npy", mmap_mode="r"), np.memmap)
    assert zoo.weights.shape == (5, D5) and zoo.weights.nbytes == 35 * 4
    np.testing.assert_array_equal(zoo.weights[:].numpy(), rows)
    np.testing.assert_array_equal(zoo.weights[[3, 0]].numpy(), rows[[3, 0]])
    np.testing.assert_array_equal(zoo.weights[2].numpy(), rows[2])
    assert zoo.labels.dtype == np.int64 and list(zoo.labels) == [1, 2, 3, 4, 5]
    assert list(zoo.meta["id"]) == [f"m{i}.pth" for i in range(5)] and list(zoo.meta["k"]) == list(range(5))
    assert zoo.spec["num_models"] == 5 and zoo.spec["dropped_nonfinite"] == 0


def test_nonfinite_rows_are_dropped_with_a_count(tmp_path):
    rows = np.ones((5, D5), dtype=np.float32)
    rows[1, 3] = np.nan
    rows[4, 0] = np.inf
    rows[2] = 7
    write(tmp_path / "zoo", rows, np.arange(5), nonfinite="drop")
    zoo = load_packed(tmp_path / "zoo")
    assert zoo.spec["dropped_nonfinite"] == 2
    assert list(zoo.meta["id"]) == ["m0.pth", "m2.pth", "m3.pth"]
    np.testing.assert_array_equal(zoo.weights[1].numpy(), 7)  # rows after a drop stay aligned with their labels
    assert list(zoo.labels) == [0, 2, 3]


def test_nonfinite_error_names_the_model_and_leaves_no_folder(tmp_path):
    rows = np.ones((4, D5), dtype=np.float32)
    rows[3, 0] = np.nan
    with pytest.raises(ProbegenError, match=r"m3.pth: non-finite"):
        write(tmp_path / "zoo", rows, np.arange(4))
    assert list(tmp_path.iterdir()) == []


def test_existing_zoo_survives_a_failed_repack(tmp_path):
    good = np.ones((2, D5), dtype=np.float32)
    write(tmp_path / "zoo", good, np.arange(2))
    bad = good.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ProbegenError):
        write(tmp_path / "zoo", bad, np.arange(2))
    np.testing.assert_array_equal(load_packed(tmp_path / "zoo").weights[:].numpy(), good)


def test_heterogeneous_models_are_stored_ragged_and_read_zero_padded(tmp_path):
    archs = [{"in": 1, "hidden": 1, "out": 1}, {"in": 2, "hidden": 3, "out": 1}]  # 4 and 13 parameters
    rows = [np.full(4, 1, np.float32), np.full(13, 2, np.float32), np.full(4, 3, np.float32)]
    with PackedWriter(tmp_path / "zoo", capacity=3, total_params=21, spec=SPEC) as w:
        for i, r in enumerate(rows):
            w.add([r], [i], [{}], [archs[0 if len(r) == 4 else 1]], [f"m{i}"])
    assert np.load(tmp_path / "zoo" / "weights.npy").shape == (21,)  # no padding on disk
    np.testing.assert_array_equal(np.load(tmp_path / "zoo" / "offsets.npy"), [0, 4, 17, 21])
    zoo = load_packed(tmp_path / "zoo")
    assert zoo.archs == archs and list(zoo.arch_ids) == [0, 1, 0]
    assert zoo.weights.shape == (3, 13) and zoo.weights.nbytes == 21 * 4
    padded = np.zeros((3, 13), np.float32)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    np.testing.assert_array_equal(zoo.weights[[2, 1, 0]].numpy(), padded[[2, 1, 0]])
    np.testing.assert_array_equal(zoo.weights[np.array([True, False, True])].numpy(), padded[[0, 2]])
    np.testing.assert_array_equal(zoo.weights[1:].numpy(), padded[1:])


def test_select_keeps_a_ragged_subset_in_the_order_given():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 9, 50)
    rows = ragged(rng.standard_normal(int(sizes.sum())).astype(np.float32), sizes)
    idx = rng.permutation(50)[:20]
    idx = idx[sizes[idx] < sizes.max()]  # the subset's largest model is smaller than the zoo's
    sub = rows.select(idx, chunk=3)  # several chunks
    assert isinstance(sub, ZooRows) and int(sub.offsets[-1]) == int(sizes[idx].sum())
    assert sub.shape == (len(idx), rows.shape[1])  # padded to the zoo's width, which the methods expect
    assert torch.equal(sub[:], rows[idx])
    assert torch.equal(sub[5], rows[int(idx[5])])


def test_a_row_of_the_wrong_size_for_its_architecture_is_refused(tmp_path):
    with pytest.raises(ProbegenError, match=r"m0: 6 parameters, but its architecture has 7"):
        with PackedWriter(tmp_path / "zoo", capacity=1, total_params=7, spec=SPEC) as w:
            w.add([np.ones(6)], [0], [{}], [ARCH5], ["m0"])
    assert list(tmp_path.iterdir()) == []


def test_more_than_declared_is_refused(tmp_path):
    with pytest.raises(ProbegenError, match=r"m1.pth: more models or parameters than declared"):
        write(tmp_path / "zoo", np.ones((3, D5), np.float32), np.arange(3), capacity=1)


@pytest.mark.parametrize("offsets", [[0, 4, 3], [1, 7], [0, 7, 7], [0, 6]])
def test_inconsistent_offsets_are_one_clear_error(tmp_path, offsets):
    write(tmp_path / "zoo", np.ones((1, D5), np.float32), np.arange(1))
    np.save(tmp_path / "zoo" / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    with pytest.raises(ProbegenError, match=r"offsets.npy: expected increasing int64 offsets"):
        load_packed(tmp_path / "zoo")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ProbegenError, match=r"weights.npy: missing"):
        load_packed(tmp_path)


@pytest.mark.parametrize("sizes", [[3, 5, 2, 5], [4, 4, 4, 4]])  # the ragged path and the uniform view
def test_indexing_follows_numpy(sizes):
    rows = ragged(np.arange(1, sum(sizes) + 1, dtype=np.float32), sizes)
    padded = rows[:].numpy()
    for idx in ([0, -2], [-1], [3, 3, 0], np.array([2, 1]), torch.tensor([1, -4]), slice(None, None, 2)):
        np.testing.assert_array_equal(rows[idx].numpy(), padded[idx if not torch.is_tensor(idx) else idx.numpy()])
    np.testing.assert_array_equal(rows[-1].numpy(), padded[-1])
    np.testing.assert_array_equal(rows[np.int64(2)].numpy(), padded[2])
    np.testing.assert_array_equal(rows.select([-1, 0])[:].numpy(), padded[[-1, 0]])
    for bad in ([4], [-5], np.array([1.7]), np.array([True, False])):
        with pytest.raises(IndexError):
            rows[bad]


def test_a_view_whose_offsets_do_not_start_at_zero():
    rows = ZooRows(torch.arange(12.0), torch.tensor([3, 6, 9, 12]))  # three models of 3, after 3 others
    assert rows[0].tolist() == [3, 4, 5] and rows[[2]].tolist() == [[9, 10, 11]]


def test_archs_of_dropped_models_are_not_listed(tmp_path):
    small, big = {"in": 1, "hidden": 1, "out": 1}, {"in": 2, "hidden": 3, "out": 1}  # 4 and 13 parameters
    bad = np.full(13, np.nan, np.float32)
    with PackedWriter(tmp_path / "zoo", capacity=3, total_params=21, spec=SPEC, nonfinite="drop") as w:
        w.add([np.ones(4), bad, np.ones(4)], [0, 1, 2], [{}] * 3, [small, big, small], ["a", "b", "c"])
    zoo = load_packed(tmp_path / "zoo")
    assert zoo.archs == [small] and list(zoo.arch_ids) == [0, 0] and zoo.weights.shape == (2, 4)


def test_no_usable_model_leaves_no_temporary_folder(tmp_path):
    writer = PackedWriter(tmp_path / "zoo", capacity=1, total_params=D5, spec=SPEC, nonfinite="drop")
    writer.add([np.full(D5, np.nan)], [0], [{}], [ARCH5], ["m0"])
    with pytest.raises(ProbegenError, match="no usable models"):
        writer.close()
    assert list(tmp_path.iterdir()) == []  # cleaned up by close(), not by the writer's garbage collection


def test_the_weights_space_is_reserved_up_front_and_trimmed_in_place(tmp_path):
    """Reserved for real (not a sparse file a memory map would fill, dying by SIGBUS when the disk is full),
    then cut to what was written: no copy, nothing left beside it."""
    writer = PackedWriter(tmp_path / "zoo", capacity=1000, total_params=1000 * D5, spec=SPEC)
    weights = writer.tmp / "weights.npy"
    assert weights.stat().st_blocks * 512 >= 1000 * D5 * 4
    writer.add(np.ones((3, D5), np.float32), [0, 1, 2], [{}] * 3, [ARCH5] * 3, ["a", "b", "c"])
    inode = weights.stat().st_ino
    writer.close()
    out = tmp_path / "zoo" / "weights.npy"
    assert out.stat().st_ino == inode and out.stat().st_size == 128 + 3 * D5 * 4
    np.testing.assert_array_equal(np.load(out), np.ones(3 * D5))
    assert sorted(p.name for p in (tmp_path / "zoo").iterdir()) == [
        "labels.npy", "meta.csv", "offsets.npy", "spec.json", "weights.npy"]


def test_truncate_copies_when_the_header_would_change_length(tmp_path):
    values = np.arange(10, dtype=np.float32)
    body = repr({"descr": "<f4", "fortran_order": False, "shape": (10,)}).encode()
    header = body + b" " * (192 - 10 - len(body) - 1) + b"\n"  # valid, padded further than numpy pads
    path = tmp_path / "w.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + np.uint16(len(header)).tobytes() + header + values.tobytes())
    np.testing.assert_array_equal(np.load(path), values)
    _truncate(path, 3)
    np.testing.assert_array_equal(np.load(path), values[:3])
    assert path.stat().st_size == 128 + 3 * 4 and [p.name for p in tmp_path.iterdir()] == ["w.npy"]


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_a_packed_zoo_follows_the_umask(tmp_path, mask, file_mode, dir_mode):
    previous = os.umask(mask)
    try:
        write(tmp_path / "zoo", np.ones((2, D5), np.float32), np.arange(2))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "zoo").stat().st_mode) == dir_mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "zoo").iterdir()} == {file_mode}


@pytest.mark.parametrize("sizes", [[3, 5, 2, 5], [4, 4, 4, 4]])
def test_take_is_indexing_without_the_checks(sizes):
    # the training loop's unchecked path returns what checked indexing returns, ragged or uniform
    rows = ragged(np.arange(1, sum(sizes) + 1, dtype=np.float32), sizes)
    idx = torch.tensor([3, 0, 3, 2])
    assert torch.equal(rows.take(idx), rows[idx])

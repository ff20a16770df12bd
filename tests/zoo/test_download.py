"""Downloads and extraction against a local HTTP server (127.0.0.1 only, no internet)."""

import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from http_fixture import serve
from probegen.errors import ProbegenError
from probegen.zoo.download import archive_format, direct_url, download, extract, fetch_zoo, sidecar_path


@pytest.fixture
def server():
    with serve() as srv:
        yield srv


def payload(n=3_000_000, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def sha(data):
    return hashlib.sha256(data).hexdigest()


def make_tar(path, files, mode="w:gz"):
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_zip(path, files, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def assert_no_leftovers(folder, expected):
    """Only the expected entries exist in folder: no temp folders, no .part files."""
    assert sorted(os.listdir(folder)) == sorted(expected)


# -----------------------------------------------------------------------------
# download

def test_resumes_after_dropped_connection(server, tmp_path):
    data = payload()
    server.files["/zoo.bin"], server.drops = data, 1
    got = download(f"{server.url}/zoo.bin", tmp_path / "zoo.bin", sha256=sha(data), backoff=0, progress=False)
    assert got["sha256"] == sha(data) and got["size"] == len(data)
    assert (tmp_path / "zoo.bin").read_bytes() == data
    (first, r1), (_, r2) = server.requests
    assert r1 is None and r2 == f"bytes={len(data) // 2}-"  # the retry asked only for the rest
    assert_no_leftovers(tmp_path, ["zoo.bin"])


def test_resumes_existing_part_file(server, tmp_path):
    data = payload()
    server.files["/zoo.bin"] = data
    (tmp_path / "zoo.bin.part").write_bytes(data[:1_000_000])
    download(f"{server.url}/zoo.bin", tmp_path / "zoo.bin", sha256=sha(data), backoff=0, progress=False)
    assert (tmp_path / "zoo.bin").read_bytes() == data
    assert [r for _, r in server.requests] == ["bytes=1000000-"]


def test_server_ignoring_range_restarts_from_scratch(server, tmp_path):
    data = payload()
    server.files["/zoo.bin"], server.drops, server.ignore_range = data, 1, True
    download(f"{server.url}/zoo.bin", tmp_path / "zoo.bin", sha256=sha(data), backoff=0, progress=False)
    assert (tmp_path / "zoo.bin").read_bytes() == data  # not the first half twice
    assert server.requests[1][1] == f"bytes={len(data) // 2}-"


def test_complete_part_file_gets_416_and_finishes(server, tmp_path):
    data = payload(100_000)
    server.files["/zoo.bin"] = data
    (tmp_path / "zoo.bin.part").write_bytes(data)
    got = download(f"{server.url}/zoo.bin", tmp_path / "zoo.bin", sha256=sha(data), backoff=0, progress=False)
    assert got["size"] == len(data) and (tmp_path / "zoo.bin").read_bytes() == data


def test_gives_up_when_no_progress(server, tmp_path):
    server.files["/zoo.bin"], server.drops, server.ignore_range = payload(), 100, True
    with pytest.raises(ProbegenError, match=r"zoo\.bin.*failed after 2 retries"):
        download(f"{server.url}/zoo.bin", tmp_path / "zoo.bin", retries=2, backoff=0, progress=False)
    assert len(server.requests) == 4  # the first attempt made progress, then 3 without
    assert not (tmp_path / "zoo.bin").exists() and (tmp_path / "zoo.bin.part").exists()


def test_http_error_is_one_clear_line(server, tmp_path):
    with pytest.raises(ProbegenError, match=r"/missing\.zip: HTTP 404"):
        download(f"{server.url}/missing.zip", tmp_path / "missing.zip", backoff=0, progress=False)
    assert len(server.requests) == 1  # a 404 is final, not retried


def test_unpinned_download_records_sidecar(server, tmp_path, capsys):
    data = payload(200_000)
    server.files["/zoo.bin"] = data
    got = download(f"{server.url}/zoo.bin", tmp_path / "zoo.bin", progress=False)
    side = json.loads(sidecar_path(tmp_path / "zoo.bin").read_text())
    assert side["sha256"] == got["sha256"] == sha(data) and side["size"] == len(data)
    assert side["url"] == f"{server.url}/zoo.bin"
    assert sha(data) in capsys.readouterr().out


def test_unpinned_cache_follows_the_url(server, tmp_path):
    server.files["/v1/zoo.bin"], server.files["/v2/zoo.bin"] = b"one" * 1000, b"two" * 1000
    download(f"{server.url}/v1/zoo.bin", tmp_path / "zoo.bin", progress=False)
    download(f"{server.url}/v1/zoo.bin", tmp_path / "zoo.bin", progress=False)
    assert len(server.requests) == 1  # cached
    download(f"{server.url}/v2/zoo.bin", tmp_path / "zoo.bin", progress=False)
    assert (tmp_path / "zoo.bin").read_bytes() == b"two" * 1000  # params changed the URL: fetched anew


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    files = {"zoo/a.pth": b"a" * 1000}
    data = make_tar(tmp_path / "src.tar.gz", files).read_bytes()
    server.files["/zoo.tar.gz"] = data
    cache, raw = tmp_path / "cache", tmp_path / "raw" / "zoo"
    wrong = "0" * 64
    with pytest.raises(ProbegenError) as err:
        fetch_zoo(f"{server.url}/zoo.tar.gz", raw, sha256=wrong, cache_dir=cache, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "zoo.tar.gz" in msg and wrong in msg and sha(data) in msg
    assert not raw.exists() and (not raw.parent.exists() or os.listdir(raw.parent) == [])
    assert_no_leftovers(cache, [])  # neither the archive nor a .part


def test_fetch_zoo_extracts_and_reuses_the_cache(server, tmp_path):
    files = {"mnist-inrs/mnist_png_training_2_7/checkpoints/model_final.pth": b"w" * 500,
             "mnist-inrs/mnist_png_testing_5_1/checkpoints/model_final.pth": b"v" * 300}
    data = make_zip(tmp_path / "src.zip", files).read_bytes()
    server.files["/sh/abc/mnist-inrs.zip"] = data
    url = f"{server.url}/sh/abc/mnist-inrs.zip?dl=0"
    cache, raw = tmp_path / "cache", tmp_path / "raw" / "mnist_inr"
    got = fetch_zoo(url, raw, sha256=sha(data), cache_dir=cache, progress=False)
    assert got["sha256"] == sha(data) and Path(got["archive"]) == cache / "mnist-inrs.zip"
    for name, content in files.items():
        assert (raw / name).read_bytes() == content
    fetch_zoo(url, raw, sha256=sha(data), cache_dir=cache, progress=False)
    assert len(server.requests) == 1  # the second fetch re-extracted from the kept download
    assert_no_leftovers(raw.parent, ["mnist_inr"])


def test_fetch_zoo_from_local_paths(tmp_path):
    files = {"cifar10/weights.npy": b"x" * 100, "cifar10/layout.csv": b"varname\n"}
    archive = make_tar(tmp_path / "cifar10.tar.xz", files, mode="w:xz")
    got = fetch_zoo(str(archive), tmp_path / "raw_a", cache_dir=tmp_path / "cache", progress=False)
    assert (tmp_path / "raw_a" / "cifar10" / "weights.npy").read_bytes() == b"x" * 100
    assert got["sha256"] == sha(archive.read_bytes())
    fetch_zoo(archive.as_uri(), tmp_path / "raw_b", cache_dir=tmp_path / "cache2", progress=False)
    assert (tmp_path / "raw_b" / "cifar10" / "layout.csv").read_bytes() == b"varname\n"
    own = tmp_path / "my_zoo"  # a researcher's own zoo, already unpacked
    (own / "run1").mkdir(parents=True)
    (own / "run1" / "checkpoint.pt").write_bytes(b"ckpt")
    fetch_zoo(str(own), tmp_path / "raw_c", progress=False)
    assert (tmp_path / "raw_c" / "run1" / "checkpoint.pt").read_bytes() == b"ckpt"
    with pytest.raises(ProbegenError, match="nowhere.zip: no such file"):
        fetch_zoo(str(tmp_path / "nowhere.zip"), tmp_path / "raw_d", cache_dir=tmp_path / "c3", progress=False)


# -----------------------------------------------------------------------------
# extraction

@pytest.mark.parametrize("make, name, evil", [
    (make_zip, "a.zip", "../escaped.txt"),
    (make_zip, "b.zip", "/tmp/absolute.txt"),
    (make_tar, "c.tar.gz", "zoo/../../escaped.txt"),
    (make_tar, "d.tar.gz", "/tmp/absolute.txt"),
])
def test_refuses_members_outside_target(tmp_path, make, name, evil):
    archive = make(tmp_path / name, {"zoo/good.txt": b"ok", evil: b"evil"})
    target = tmp_path / "out" / "zoo"
    with pytest.raises(ProbegenError, match="refusing member") as err:
        extract(archive, target)
    assert evil in str(err.value) and name in str(err.value)
    assert not target.exists() and os.listdir(tmp_path / "out") == []
    assert not (tmp_path / "escaped.txt").exists()


def test_refuses_symlink_pointing_outside(tmp_path):
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tf:
        link = tarfile.TarInfo("zoo/link")
        link.type, link.linkname = tarfile.SYMTYPE, "../../outside"
        tf.addfile(link)
    with pytest.raises(ProbegenError, match="'zoo/link'.*links outside"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_keeps_symlinks_inside(tmp_path):
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("zoo/data.bin")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("zoo/sub/alias")
        link.type, link.linkname = tarfile.SYMTYPE, "../data.bin"
        tf.addfile(link)
    extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "zoo" / "sub" / "alias").read_bytes() == b"abc"


def test_failed_extraction_keeps_previous_target(tmp_path):
    target = tmp_path / "zoo"
    target.mkdir()
    (target / "old.txt").write_text("old")
    archive = make_zip(tmp_path / "bad.zip", {"new.txt": b"new", "../x": b"x"})
    with pytest.raises(ProbegenError):
        extract(archive, target)
    assert_no_leftovers(target, ["old.txt"])
    assert_no_leftovers(tmp_path, ["bad.zip", "zoo"])


@pytest.mark.parametrize("kind", ["tar.xz", "tar.gz", "zip"])
def test_truncated_archive_is_one_clear_error(tmp_path, kind):
    files = {f"zoo/model_{i}.pth": payload(100_000, seed=i) for i in range(4)}
    good = tmp_path / f"good.{kind}"
    if kind == "zip":
        make_zip(good, files)
    else:
        make_tar(good, files, mode="w:" + kind.split(".")[1])
    bad = tmp_path / f"bad.{kind}"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pattern = r"bad\.%s: corrupt, truncated" % kind.replace(".", r"\.")
    with pytest.raises(ProbegenError, match=pattern) as err:
        extract(bad, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert_no_leftovers(tmp_path, [good.name, bad.name])
    extract(good, tmp_path / "out")  # the intact archive extracts fine
    assert (tmp_path / "out" / "zoo" / "model_3.pth").read_bytes() == files["zoo/model_3.pth"]


def test_corrupt_zip_member_is_one_clear_error(tmp_path):
    good = make_zip(tmp_path / "z.zip", {"zoo/a.bin": payload(50_000)}, compression=zipfile.ZIP_STORED)
    data = bytearray(good.read_bytes())
    data[20_000] ^= 0xFF  # inside the stored member: the CRC check must catch it
    good.write_bytes(bytes(data))
    with pytest.raises(ProbegenError, match=r"z\.zip: corrupt, truncated.*CRC"):
        extract(good, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_cached_download_is_dropped_when_unpinned(server, tmp_path):
    server.files["/zoo.zip"] = b"PK\x03\x04 definitely not a zip"
    cache = tmp_path / "cache"
    with pytest.raises(ProbegenError, match="zoo.zip: corrupt.*rerun to fetch it again") as err:
        fetch_zoo(f"{server.url}/zoo.zip", tmp_path / "raw", cache_dir=cache, progress=False)
    assert "\n" not in str(err.value)
    assert_no_leftovers(cache, [])


def test_your_own_archive_is_read_in_place_every_time(tmp_path):
    """source: path reads the archive where it is: an edit is what the next fetch sees (no stale copy)."""
    archive = make_tar(tmp_path / "mine.tar.gz", {"zoo/a.pth": b"one"})
    fetch_zoo(str(archive), tmp_path / "raw", cache_dir=tmp_path / "cache", progress=False)
    make_tar(archive, {"zoo/a.pth": b"two"})
    fetch_zoo(str(archive), tmp_path / "raw", cache_dir=tmp_path / "cache", progress=False)
    assert (tmp_path / "raw/zoo/a.pth").read_bytes() == b"two" and not (tmp_path / "cache").exists()
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(ProbegenError, match="bad.zip: corrupt"):
        fetch_zoo(str(bad), tmp_path / "raw2", progress=False)
    assert bad.exists()  # your file is never deleted


# -----------------------------------------------------------------------------
# URLs

def test_direct_url():
    mnist = "https://www.dropbox.com/sh/56pakaxe58z29mq/AABrctdu2U65jGYr2WQRzmMna/mnist-inrs.zip?dl=0"
    assert direct_url(mnist) == mnist[:-1] + "1"
    newer = "https://www.dropbox.com/scl/fo/abc/def/mnist-inrs.zip?rlkey=xyz&e=1&dl=0"
    assert direct_url(newer) == "https://www.dropbox.com/scl/fo/abc/def/mnist-inrs.zip?rlkey=xyz&e=1&dl=1"
    assert direct_url("https://www.dropbox.com/s/abc/f.zip").endswith("f.zip?dl=1")
    gcs = "https://storage.cloud.google.com/gresearch/smallcnnzoo-dataset/cifar10.tar.xz"
    assert direct_url(gcs) == "https://storage.googleapis.com/gresearch/smallcnnzoo-dataset/cifar10.tar.xz"
    zenodo = "https://zenodo.org/records/12797219/files/cnn_wild_park.zip?download=1"
    assert direct_url(zenodo) == zenodo


# -----------------------------------------------------------------------------
# archive format, by content

def torch_checkpoint_bytes():
    import torch
    buf = io.BytesIO()
    torch.save({"seq.0.weight": torch.arange(6.0).reshape(3, 2)}, buf)
    return buf.getvalue()


def test_plain_tar_ending_with_a_checkpoint_is_a_tar(tmp_path):
    """A .pth checkpoint is itself a zip: zipfile.is_zipfile finds its directory at the end of the tar."""
    files = {"zoo/readme.txt": b"hello", "zoo/model_final.pth": torch_checkpoint_bytes()}
    archive = make_tar(tmp_path / "zoo.tar", files, mode="w")
    assert zipfile.is_zipfile(archive)  # the trap
    extract(archive, tmp_path / "out")
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    assert sorted(os.listdir(tmp_path / "out" / "zoo")) == ["model_final.pth", "readme.txt"]


@pytest.mark.parametrize("mode, name", [("w", "zoo.zip"), ("w:gz", "zoo.bin"), ("w:xz", "zoo.tar"),
                                        ("w:bz2", "zoo"), ("zip", "zoo.tar.gz")])
def test_format_is_read_from_the_content_not_the_name(tmp_path, mode, name):
    files = {"zoo/a.pth": b"a" * 100}
    archive = make_zip(tmp_path / name, files) if mode == "zip" else make_tar(tmp_path / name, files, mode=mode)
    assert archive_format(archive) == ("zip" if mode == "zip" else "tar")
    extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "zoo" / "a.pth").read_bytes() == b"a" * 100


def test_not_an_archive_is_one_line(tmp_path):
    bad = tmp_path / "zoo.zip"
    bad.write_bytes(b"just some text, not an archive" * 40)
    with pytest.raises(ProbegenError, match=r"zoo\.zip: not a zip or tar archive") as err:
        extract(bad, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_an_archive_without_files_is_refused(tmp_path, kind):
    archive = tmp_path / f"empty.{kind}"
    if kind == "zip":
        make_zip(archive, {})
    else:
        with tarfile.open(archive, "w") as tf:
            info = tarfile.TarInfo("zoo")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
    with pytest.raises(ProbegenError, match="holds no files"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# a researcher's own zoo folder (source: path)

def own_zoo(tmp_path):
    own = tmp_path / "my_zoo"
    (own / "run1").mkdir(parents=True)
    (own / "run1" / "checkpoint.pt").write_bytes(b"ckpt")
    return own


@pytest.mark.parametrize("case, message", [
    ("self_loop", "a symlink loop"),
    ("cycle", "a symlink loop"),
    ("ancestor", "a symlink loop"),
    ("outside_file", "a symlink pointing outside the zoo folder"),
    ("outside_dir", "a symlink pointing outside the zoo folder"),
    ("dangling", "a broken symlink"),
    ("twice", "a folder linked twice"),
    ("fifo", "not a regular file"),
])
def test_own_folder_links_and_special_files_are_refused(tmp_path, case, message):
    own = own_zoo(tmp_path)
    (tmp_path / "secret.txt").write_text("outside")
    link = own / "run1" / "link"
    if case == "self_loop":
        link.symlink_to("link")
    if case == "cycle":
        link.symlink_to("other")
        (own / "run1" / "other").symlink_to("link")
    if case == "ancestor":
        link.symlink_to("..")
    if case == "outside_file":
        link.symlink_to(tmp_path / "secret.txt")
    if case == "outside_dir":
        link.symlink_to("../..")
    if case == "dangling":
        link.symlink_to("nowhere")
    if case == "twice":
        (own / "alias").symlink_to("run1")
    if case == "fifo":
        os.mkfifo(own / "run1" / "pipe")
    with pytest.raises(ProbegenError, match=message) as err:
        fetch_zoo(str(own), tmp_path / "raw", progress=False)
    assert "\n" not in str(err.value) and str(own) in str(err.value)
    assert not (tmp_path / "raw").exists()


def test_own_folder_links_inside_are_copied_as_files(tmp_path):
    own = own_zoo(tmp_path)
    (own / "run2").mkdir()
    (own / "run2" / "checkpoint.pt").symlink_to("../run1/checkpoint.pt")
    fetch_zoo(own.as_uri(), tmp_path / "raw", progress=False)
    copy = tmp_path / "raw" / "run2" / "checkpoint.pt"
    assert copy.read_bytes() == b"ckpt" and not copy.is_symlink()


@pytest.mark.parametrize("layout", ["empty", "only_folders"])
def test_an_empty_own_folder_is_refused_at_fetch(tmp_path, layout):
    own = tmp_path / "my_zoo"
    own.mkdir()
    if layout == "only_folders":
        (own / "a" / "b").mkdir(parents=True)
    with pytest.raises(ProbegenError, match=r"my_zoo: the zoo folder holds no files") as err:
        fetch_zoo(str(own), tmp_path / "raw", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "raw").exists()

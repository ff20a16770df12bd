"""The atomic writers: temp names, stale temps, write errors as one line, the user's umask.

Full disks and real signals are in test_reliability.py."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from probegen.errors import ProbegenError
from probegen.io import (atomic_dir, atomic_path, process_alive, remove_stale_temps, temp_pattern, write_json,
                         write_npy)


def temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def dead_pid():
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def umask():
    """Set the process umask for one test, restore it after."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def test_temp_names_carry_the_pid_and_the_target(tmp_path):
    with atomic_path(tmp_path / "model.pt") as tmp:
        match = temp_pattern(tmp_path / "model.pt").fullmatch(tmp.name)
        assert match and int(match.group(1)) == os.getpid() and tmp.parent == tmp_path
        tmp.write_text("x")
    with atomic_dir(tmp_path / "zoo") as tmp:
        assert temp_pattern(tmp_path / "zoo").fullmatch(tmp.name)
    assert (tmp_path / "model.pt").read_text() == "x" and temps(tmp_path) == []


def test_stale_temps_of_the_target_are_removed_before_it_is_written(tmp_path, dead_pid):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale_file = tmp_path / f".model.pt.{dead_pid}.abcd1234.tmp"
        stale_dir = tmp_path / f".model.pt.{dead_pid}.zz_9zz99.tmp"
        alive = tmp_path / f".model.pt.{live.pid}.abcd1234.tmp"
        other_target = tmp_path / f".model.pt.old.{dead_pid}.abcd1234.tmp"  # a temp of "model.pt.old"
        not_a_temp = tmp_path / ".model.pt.notes.tmp"
        stale_file.write_text("half a model")
        stale_dir.mkdir()
        (stale_dir / "weights.npy").write_bytes(b"\0" * 100)
        for p in (alive, other_target, not_a_temp):
            p.write_text("keep")
        write_json(tmp_path / "model.pt", {"a": 1})
        assert not stale_file.exists() and not stale_dir.exists()
        assert alive.exists() and other_target.exists() and not_a_temp.exists()
        assert json.loads((tmp_path / "model.pt").read_text()) == {"a": 1}
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temps(tmp_path / "model.pt") == [alive]  # its process has exited now


def test_a_zombie_does_not_count_as_alive(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(200):  # exited but not reaped: a zombie still answers os.kill(pid, 0)
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.05)
        os.kill(proc.pid, 0)
        assert not process_alive(proc.pid)
    finally:
        proc.wait()
    assert process_alive(os.getpid())


def test_an_error_in_the_block_keeps_the_previous_output_and_removes_the_temp(tmp_path):
    write_npy(tmp_path / "a.npy", np.arange(3))
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "old.txt").write_text("old")
    with pytest.raises(ValueError, match="bad input"):  # not a write failure: propagates unchanged
        with atomic_path(tmp_path / "a.npy") as tmp:
            tmp.write_bytes(b"partial")
            raise ValueError("bad input")
    with pytest.raises(FileNotFoundError):  # an input that is missing is not this output's fault
        with atomic_dir(tmp_path / "zoo") as tmp:
            (tmp / "new.txt").write_text("new")
            open(tmp_path / "no-such-input")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(3))
    assert [p.name for p in (tmp_path / "zoo").iterdir()] == ["old.txt"] and temps(tmp_path) == []


def test_a_failed_write_inside_a_folder_is_one_line_naming_its_final_path(tmp_path):
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "old.txt").write_text("old")
    with pytest.raises(ProbegenError) as info:
        with atomic_dir(tmp_path / "zoo") as tmp:
            (tmp / "runs").write_text("a file where a folder should be")
            (tmp / "runs" / "0.json").write_text("{}")  # NotADirectoryError inside the temp
    assert str(info.value) == f"{tmp_path / 'zoo' / 'runs' / '0.json'}: cannot write it: Not a directory (ENOTDIR)"
    assert [p.name for p in (tmp_path / "zoo").iterdir()] == ["old.txt"] and temps(tmp_path) == []


def test_a_target_whose_folder_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "metrics").write_text("a file, not a folder")
    with pytest.raises(ProbegenError, match=r"metrics/x\.json: cannot write it: .*(EEXIST|ENOTDIR)"):
        write_json(tmp_path / "metrics" / "x.json", {})


def test_replacing_a_folder_leaves_no_aside_copy(tmp_path):
    for content in ("old", "new"):
        with atomic_dir(tmp_path / "zoo") as tmp:
            (tmp / f"{content}.txt").write_text(content)
    assert [p.name for p in (tmp_path / "zoo").iterdir()] == ["new.txt"] and temps(tmp_path) == []


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_outputs_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    write_json(tmp_path / "m.json", {})
    write_npy(tmp_path / "a.npy", np.zeros(2))
    with atomic_path(tmp_path / "model.pt") as tmp:
        tmp.write_bytes(b"x")
    with atomic_dir(tmp_path / "zoo") as tmp:
        (tmp / "f.txt").write_text("x")
    for name in ("m.json", "a.npy", "model.pt", "zoo/f.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == file_mode, name
    assert stat.S_IMODE((tmp_path / "zoo").stat().st_mode) == dir_mode


def test_a_signal_is_held_back_until_the_renames_are_done(tmp_path):
    """deferred_interrupts(): the block finishes, then the stage is interrupted (a real SIGTERM)."""
    script = tmp_path / "stage.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from probegen.errors import cli, deferred_interrupts\n"
        "@cli\n"
        "def main():\n"
        "    with deferred_interrupts():\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.3)\n"
        "        print('block finished', flush=True)\n"
        "    print('after the block', flush=True)\n"
        "if __name__ == '__main__':\n"
        "    main()\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert proc.stdout == "block finished\n" and proc.stderr == "interrupted (SIGTERM)\n"


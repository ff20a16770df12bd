"""Issue 13, for real: a full filesystem, killed parents, signals, concurrent reruns, DVC's view of temps.

The full disk is a real small filesystem mounted for the test (tmpfs, then a loop-mounted ext4 image);
where this machine does not allow mounting (not root, no loop devices) those tests skip and say why.
Anything that could crash the interpreter (a write through a memory map on a full disk dies by SIGBUS)
runs in a child process.
"""

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run
from probegen.errors import ProbegenError
from probegen.io import atomic_dir, atomic_path, process_alive, write_json, write_npy

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"}


def temps(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------- a full disk


class SmallFilesystem:
    def __init__(self, path):
        self.path = path

    def free(self):
        st = os.statvfs(self.path)
        return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize

    def fill(self, name="filler"):
        """Write a file until the filesystem refuses: ENOSPC for real."""
        with pytest.raises(OSError) as info:
            with open(self.path / name, "wb") as f:
                while True:
                    f.write(b"\xff" * 4096)
                    f.flush()
        assert info.value.errno == errno.ENOSPC


def _mount(kind, mnt, scratch):
    """Mount a small filesystem of `kind` at mnt; return None, or why it could not be done here."""
    if os.geteuid() != 0:
        return "mounting needs root"
    if kind == "tmpfs":
        cmds = [["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]]
    else:
        if not shutil.which("mkfs.ext4"):
            return "mkfs.ext4 is not installed"
        image = scratch / "ext4.img"
        cmds = [["truncate", "-s", "8M", str(image)], ["mkfs.ext4", "-q", "-F", str(image)],
                ["mount", "-o", "loop", str(image), str(mnt)]]
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}"
    return None


@pytest.fixture(params=["tmpfs", "ext4"])
def small_fs(request, tmp_path):
    """A real filesystem of a few MB (tmpfs, or ext4 on a loop device), unmounted after the test."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    why = _mount(request.param, mnt, tmp_path)
    if why:
        pytest.skip(f"no {request.param} filesystem for a real full disk here: {why}")
    yield SmallFilesystem(mnt)
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_atomic_writers_on_a_full_disk_are_one_line_and_keep_the_previous_outputs(small_fs):
    out = small_fs.path / "out"
    big = np.ones(1 << 20, np.float32)  # 4 MB: more than the filesystem holds
    write_json(out / "m.json", {"v": 1})
    write_npy(out / "a.npy", np.arange(4))
    write_model = {"path": torch.save, "file": save_through_a_file}  # the two ways the stages save models
    for how, save in write_model.items():
        with atomic_path(out / f"{how}.pt") as tmp:
            save({"w": torch.zeros(3)}, tmp)
    with atomic_dir(out / "plots") as tmp:
        (tmp / "p.csv").write_text("old")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    small_fs.fill()
    free = small_fs.free()

    def fails(path):
        return pytest.raises(ProbegenError, match=rf"^{re.escape(str(path))}: cannot write it: No space left on "
                                                  rf"device \(ENOSPC\); the previous version, if any, is unchanged$")

    with fails(out / "m.json"):
        write_json(out / "m.json", {"v": [0.5] * 100_000})
    with fails(out / "a.npy"):  # numpy says only "n requested and m written"
        write_npy(out / "a.npy", big)
    for how, save in write_model.items():  # torch.save on a path says only "unexpected pos"
        with fails(out / f"{how}.pt"):
            with atomic_path(out / f"{how}.pt") as tmp:
                save({"w": torch.from_numpy(big)}, tmp)
    with fails(out / "plots"):
        with atomic_dir(out / "plots") as tmp:
            np.save(tmp / "big.npy", big)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert temps(out) == [] and small_fs.free() >= free  # the temps are gone, and so is their space


def save_through_a_file(obj, path):
    with open(path, "wb") as f:
        torch.save(obj, f)


def _pack_script(tmp_path):
    """pack a zoo of n SIRENs into `out` through @cli; with fill=1 the disk fills up after the reservation."""
    script = tmp_path / "pack_stage.py"
    script.write_text(textwrap.dedent("""
        import sys
        import numpy as np
        from probegen.errors import cli
        from probegen.zoo.formats.dwsnets_inr import ARCH, SPEC
        from probegen.zoo.packed import PackedWriter

        @cli
        def main(out, n, fill):
            n = int(n)
            with PackedWriter(out, capacity=n, total_params=n * 1185, spec=SPEC) as w:
                if fill == "1":
                    try:
                        with open(out + ".filler", "wb") as f:
                            while True:
                                f.write(bytes(4096))
                                f.flush()
                    except OSError:
                        pass
                for s in range(0, n, 50):
                    k = min(50, n - s)
                    w.add(np.ones((k, 1185), np.float32), np.arange(s, s + k) % 10, [{}] * k, [ARCH] * k,
                          [f"m{i}" for i in range(s, s + k)])
            print("packed", n)

        if __name__ == "__main__":
            main(*sys.argv[1:])
    """))
    return script


@pytest.mark.parametrize("n, fill", [(3000, "0"), (60, "1")], ids=["reservation", "metadata"])
def test_packing_on_a_full_disk_is_one_line_and_keeps_the_previous_zoo(small_fs, tmp_path, n, fill):
    """3000 SIRENs (14 MB) do not fit: the reservation fails before any model is written. 60 fit, but
    the disk is full when offsets, labels and meta are written. Before: SIGBUS, and a temp folder left."""
    script, zoo = _pack_script(tmp_path), small_fs.path / "zoo"
    stage = [sys.executable, str(script), str(zoo)]
    subprocess.run(stage + ["10", "0"], cwd=tmp_path, env=ENV, check=True, capture_output=True, timeout=120)
    before = {p.name: p.read_bytes() for p in zoo.iterdir()}
    proc = subprocess.run(stage + [str(n), fill], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: {zoo}: cannot write it: No space left on device (ENOSPC); the previous version, if any, is unchanged"]
    assert {p.name: p.read_bytes() for p in zoo.iterdir()} == before
    assert temps(small_fs.path) == []


def test_a_mapped_write_on_this_full_disk_dies_by_sigbus(small_fs):
    """What the packer did before (write through open_memmap into a sparse file): the fault is real here."""
    code = ("import numpy as np, sys\n"
            "a = np.lib.format.open_memmap(sys.argv[1], mode='w+', dtype=np.float32, shape=(1 << 21,))\n"
            "a[:] = 1\n")
    proc = subprocess.run([sys.executable, "-c", code, str(small_fs.path / "w.npy")], capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGBUS


def test_a_full_disk_outside_the_atomic_writers_is_one_line_too(tmp_path):
    """/dev/full: every write fails with ENOSPC; @cli reports it in one line (no mount needed)."""
    script = tmp_path / "stage.py"
    script.write_text("import sys\nfrom probegen.errors import cli\n@cli\ndef main():\n"
                      "    with open('/dev/full', 'w') as f:\n        f.write('x' * 10000)\n"
                      "if __name__ == '__main__':\n    main()\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr == "error: a write: No space left on device (ENOSPC)\n"


# ------------------------------------------------------------------------------- killed parents, signals


SLOW_STAGE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from probegen.errors import cli
    from probegen.io import atomic_path

    @cli
    def main(out, seconds):
        with atomic_path(out) as tmp:
            tmp.write_text("partial")
            Path(out + ".started").write_text(str(os.getpid()))
            time.sleep(float(seconds))
            tmp.write_text("done")
        print("wrote", out)

    if __name__ == "__main__":
        main(*sys.argv[1:])
""")


@pytest.fixture
def slow_stage(tmp_path):
    """A stage that writes `out` atomically after `seconds`; out.started holds its pid once it runs."""
    (tmp_path / "slow_stage.py").write_text(SLOW_STAGE)
    return tmp_path / "slow_stage.py"


def wait_for(predicate, timeout=30.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


def started(marker):
    return lambda: marker.exists() and marker.read_text().strip() and int(marker.read_text())


def gone(pid, timeout=3.0):
    return wait_for(lambda: not process_alive(pid), timeout)


STAGE_SECONDS = 6  # how long the slow stage takes: longer than gone() waits, so an orphan is still alive


def after_it_would_have_written(marker):
    time.sleep(max(0.0, marker.stat().st_mtime + STAGE_SECONDS + 0.5 - time.time()))


def test_a_stage_dies_with_its_killed_parent_and_writes_nothing_after(slow_stage, tmp_path):
    parent_code = ("import subprocess, sys, time\n"
                   f"subprocess.Popen([sys.executable, sys.argv[1], 'out.txt', '{STAGE_SECONDS}'])\n"
                   "plain = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(8)'])\n"
                   "open('plain.pid', 'w').write(str(plain.pid))\n"
                   "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(slow_stage)], cwd=tmp_path, env=ENV)
    pid = wait_for(started(tmp_path / "out.txt.started"))
    plain = wait_for(started(tmp_path / "plain.pid"))
    assert pid and plain, "the stage did not start"
    parent.kill()
    parent.wait()
    try:
        assert gone(pid), "the stage outlived its parent"
        assert process_alive(plain)  # a child without the guard does outlive it: the fault is real here
    finally:
        os.kill(plain, signal.SIGKILL)
    after_it_would_have_written(tmp_path / "out.txt.started")
    assert not (tmp_path / "out.txt").exists() and temps(tmp_path) == []


def test_sigterm_is_a_clean_exit_that_removes_the_temp(slow_stage, tmp_path):
    (tmp_path / "out.txt").write_text("old")
    proc = subprocess.Popen([sys.executable, str(slow_stage), "out.txt", "30"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(started(tmp_path / "out.txt.started"))
    assert len(temps(tmp_path)) == 1
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM and err == "interrupted (SIGTERM)\n" and out == ""
    assert (tmp_path / "out.txt").read_text() == "old" and temps(tmp_path) == []


def test_a_sigkilled_writers_temp_is_removed_by_the_next_write_of_its_target(slow_stage, tmp_path):
    proc = subprocess.Popen([sys.executable, str(slow_stage), "out.txt", "30"], cwd=tmp_path, env=ENV)
    assert wait_for(started(tmp_path / "out.txt.started"))
    proc.kill()  # no handler runs: the temp stays behind
    proc.wait()
    left = temps(tmp_path)
    assert len(left) == 1 and f".{proc.pid}." in left[0]
    (tmp_path / f".other.txt.{proc.pid}.abcd1234.tmp").write_text("another target's")
    done = subprocess.run([sys.executable, str(slow_stage), "out.txt", "0"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0 and (tmp_path / "out.txt").read_text() == "done"
    assert temps(tmp_path) == [f".other.txt.{proc.pid}.abcd1234.tmp"]


def test_a_named_stage_gets_the_guard_in_process_and_leaves_no_trace(tmp_path, monkeypatch):
    """cli(fn, stage=...) (how probegen.cli runs its commands): the lock is taken, handlers are restored
    and the parent-death signal is cleared afterwards, so an in-process caller is left as it was."""
    import ctypes

    from probegen.errors import cli, lock_folder

    monkeypatch.chdir(tmp_path)
    libc, seen = ctypes.CDLL(None, use_errno=True), {}

    def pdeathsig():
        value = ctypes.c_int()
        libc.prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
        return value.value

    def work(zoo):
        seen.update(lock=(lock_folder() / f"pack.{zoo}.lock").read_text(), signal=pdeathsig(),
                    handler=signal.getsignal(signal.SIGTERM))
        raise ProbegenError(f"{zoo}: bad")

    before = signal.getsignal(signal.SIGTERM), pdeathsig()
    with pytest.raises(SystemExit) as info:
        cli(work, stage="pack.tiny")("tiny")
    assert info.value.code == 1 and seen["lock"] == f"{os.getpid()}\n" and seen["signal"] == signal.SIGTERM
    assert seen["handler"] not in (signal.SIG_DFL, before[0])
    assert (signal.getsignal(signal.SIGTERM), pdeathsig()) == before


def test_a_parent_that_died_before_the_guard_was_set_is_noticed(tmp_path):
    """The prctl race: the parent exits after the stage imported probegen but before main() starts."""
    (tmp_path / "late_stage.py").write_text(textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from probegen.errors import cli

        @cli
        def main():
            Path("out.txt").write_text("written")

        if __name__ == "__main__":
            Path("imported").write_text("1")
            time.sleep(1.5)
            main()
    """))
    parent_code = ("import subprocess, sys, time, os\n"
                   "subprocess.Popen([sys.executable, 'late_stage.py'], stderr=open('stderr.txt', 'w'))\n"
                   "while not os.path.exists('imported'): time.sleep(0.02)\n")
    subprocess.run([sys.executable, "-c", parent_code], cwd=tmp_path, env=ENV, timeout=60, check=True)
    assert wait_for(lambda: (tmp_path / "stderr.txt").read_text(), timeout=20) == \
        "interrupted (its parent process exited before the stage started)\n"
    assert not (tmp_path / "out.txt").exists()


def test_a_rerun_waits_for_the_run_still_going_then_refuses(slow_stage, tmp_path):
    first = subprocess.Popen([sys.executable, str(slow_stage), "out.txt", "10"], cwd=tmp_path, env=ENV,
                             stdout=subprocess.DEVNULL)
    pid = wait_for(started(tmp_path / "out.txt.started"))
    refused = subprocess.run([sys.executable, str(slow_stage), "out.txt", "10"], cwd=tmp_path,
                             env={**ENV, "PROBEGEN_LOCK_WAIT": "0.5"}, capture_output=True, text=True)
    assert refused.returncode == 1
    lock = Path(".probegen") / "locks" / "slow_stage.out.txt.10.lock"
    assert refused.stderr.splitlines()[-1] == (
        f"error: {lock}: another run of this stage (pid {pid}) is still running after 0.5 s; "
        f"wait for it or stop it (kill {pid}), then rerun")
    other = subprocess.run([sys.executable, str(slow_stage), "other.txt", "0"], cwd=tmp_path, env=ENV,
                           stdout=subprocess.DEVNULL)
    assert other.returncode == 0 and first.poll() is None  # another target runs alongside
    again = subprocess.Popen([sys.executable, str(slow_stage), "out.txt", "10"], cwd=tmp_path, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    holder = int((tmp_path / "out.txt.started").read_text())
    assert first.poll() is not None or holder == pid  # while the first runs, the rerun waits: not started
    assert first.wait(timeout=30) == 0
    _, err = again.communicate(timeout=30)
    assert again.returncode == 0 and "waiting up to 60 s for the run still going" in err
    assert (tmp_path / "out.txt").read_text() == "done"


# --------------------------------------------------------------------------------------- under real DVC


def _dvc_project(path, slow_stage):
    path.mkdir()
    shutil.copy(slow_stage, path / "slow_stage.py")
    (path / "dvc.yaml").write_text(f"stages:\n  slow:\n    cmd: python slow_stage.py out.txt {STAGE_SECONDS}\n"
                                   "    deps: [slow_stage.py]\n    outs: [out.txt]\n")
    (path / ".gitignore").write_text("*.started\n")
    run("git init -q && dvc init -q && git add -A && git commit -qm init", path)
    return path


@pytest.mark.parametrize("shell, sig", [("/bin/bash", signal.SIGKILL), ("/bin/sh", signal.SIGKILL),
                                        ("/bin/bash", signal.SIGTERM)],
                         ids=["bash-kill", "sh-kill", "bash-term"])
def test_killing_dvc_ends_its_stage_and_the_rerun_does_not_race_it(slow_stage, tmp_path, shell, sig):
    """DVC runs `$SHELL -c cmd`: bash execs the stage (its parent is DVC), dash stays between them."""
    if not os.path.exists(shell):
        pytest.skip(f"{shell} is not installed")
    project = _dvc_project(tmp_path / "p", slow_stage)
    env = {**ENV, "SHELL": shell, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dvc = subprocess.Popen(["dvc", "repro"], cwd=project, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    pid = wait_for(started(project / "out.txt.started"), timeout=60)
    assert pid, "the stage did not start"
    dvc.send_signal(sig)
    dvc.wait()
    assert gone(pid), "the stage outlived DVC"
    after_it_would_have_written(project / "out.txt.started")
    assert not (project / "out.txt").exists() and temps(project) == []
    rerun = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (project / "out.txt").read_text() == "done"


def test_temp_names_do_not_change_what_dvc_sees(tmp_path):
    """A stray temp in a dependency folder: the project's .dvcignore must keep it out of the hash."""
    project = tmp_path / "p"
    (project / "models").mkdir(parents=True)
    (project / "models" / "a.pt").write_text("a model")
    (project / "dvc.yaml").write_text("stages:\n  agg:\n    cmd: ls models > summary.txt\n"
                                      "    deps: [models]\n    outs: [summary.txt]\n")
    run("git init -q && dvc init -q", project)
    shutil.copy(ROOT / ".dvcignore", project / ".dvcignore")
    run("git add -A && git commit -qm init && dvc repro -q", project)

    def up_to_date():
        return "up to date" in run("dvc status", project).stdout

    assert up_to_date()
    (project / "models" / ".a.pt.12345.abcd1234.tmp").write_text("half a model")  # a killed writer's
    (project / "models" / ".b.pt.12345.zzzz9999.tmp").mkdir()
    (project / "models" / ".b.pt.12345.zzzz9999.tmp" / "x").write_text("x")
    assert up_to_date(), "a temp name entered the dependency hash: .dvcignore needs the line `.*.tmp`"
    (project / "models" / "b.pt").write_text("a real new model")
    assert not up_to_date()  # the check can see a change at all


# ----------------------------------------------------------------------------------- one clear line


def test_evaluate_with_no_bootstrap_draws_is_one_line():
    from probegen.patching.evaluate import evaluate, summarize
    from probegen.patching.graph import Graph, Node

    graph = Graph(["x"], [Node("out", lambda h: 2 * h, {"h": ("x",)})], "out")
    x_r, x_c = torch.randn(6, 3), torch.randn(6, 3)
    for bad in (0, -1, 2.5, True):
        expected = rf"^n_boot: expected a positive integer \(bootstrap draws\), got {re.escape(repr(bad))}$"
        with pytest.raises(ProbegenError, match=expected):
            evaluate(graph, ["{x -> out}"], x_r, x_c, metric="sq", n_boot=bad)
        with pytest.raises(ProbegenError, match="^n_boot: "):
            summarize(np.ones(6), np.ones(6), n_boot=bad)
    assert evaluate(graph, ["{x -> out}"], x_r, x_c, metric="sq", n_boot=1)[0]["explained"] == pytest.approx(1.0)


@pytest.mark.parametrize("fn", [lambda h: h.sum(0), lambda h: h.mean(0, keepdim=True), lambda h: h.sum()],
                         ids=["sum", "mean-keepdim", "scalar"])
def test_a_node_that_reduces_over_the_batch_is_named(fn):
    from probegen.patching.evaluate import evaluate
    from probegen.patching.graph import Graph, Node

    graph = Graph(["x"], [Node("pool", fn, {"h": ("x",)}), Node("out", lambda h: 2 * h, {"h": ("x", "pool")})],
                  "out")
    with pytest.raises(ProbegenError, match=r"^graph node 'pool': output of shape .* for inputs of batch size 6"):
        evaluate(graph, ["{x -> out}"], torch.randn(6, 3), torch.randn(6, 3), metric="sq", n_boot=10)

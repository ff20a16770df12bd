"""Bad input through the real stage scripts: one `error:` line naming the culprit, exit 1, no outputs."""

import numpy as np
import pytest
import yaml

from conftest import make_project, run, tiny_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """A project whose tiny embedded zoos are fetched, packed and split (no DVC involved)."""
    repo = make_project(tmp_path_factory.mktemp("stages") / "repo", tiny_params())
    for zoo in ("digits_inr", "digits_cnn"):
        for stage in ("fetch", "pack", "split"):
            run(f"python -m stages.{stage} {zoo}", repo)
    return repo


def set_params(repo, **changes):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.update(changes)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def assert_one_error_line(proc, *needles):
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    # Progress bars may come before it; the error itself is one line, and the last.
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_unknown_method_names_it(fetched):
    proc = run("python -m stages.train digits_inr probegenn", fetched, check=False)
    assert_one_error_line(proc, "probegenn")
    assert not (fetched / "models/digits_inr/probegenn").exists()


@pytest.mark.parametrize("script", ["check", "fetch", "pack", "split", "render_probes", "train", "localize",
                                    "induction", "aggregate"])
def test_stage_scripts_answer_help_and_wrong_arguments_with_a_usage_line(fetched, script):
    proc = run(f"python -m stages.{script} --help", fetched, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: python -m stages.{script}"), proc.stderr
    assert "Traceback" not in proc.stderr and not (fetched / "metrics/summary.json").exists()  # nothing ran
    proc = run(f"python -m stages.{script} one two three", fetched, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("usage:") and "Traceback" not in proc.stderr


def test_the_probegen_command_lists_the_stages_and_tools(fetched):
    proc = run("probegen --help", fetched)
    for command in ("check", "fetch", "pack", "split", "render-probes", "train", "localize", "induction",
                    "aggregate", "bench", "plots"):
        assert command in proc.stdout
    assert run("probegen nope", fetched, check=False).returncode == 2


def test_unknown_zoo_names_the_key(fetched):
    proc = run("python -m stages.fetch imagenet_inr", fetched, check=False)
    assert_one_error_line(proc, "zoo.imagenet_inr")
    assert not (fetched / "data/raw/imagenet_inr").exists()


@pytest.mark.parametrize("value", [0, -1, "many", 2.5])
def test_bad_num_probes_fails_before_training(fetched, value):
    set_params(fetched, num_probes=value)
    try:
        proc = run("python -m stages.train digits_inr probegen", fetched, check=False)
    finally:
        set_params(fetched, num_probes=4)
    assert_one_error_line(proc, "num_probes")
    assert not (fetched / "models/digits_inr/probegen").exists()


def test_dvc_reports_an_unknown_zoo(tmp_path):
    repo = make_project(tmp_path / "repo", tiny_params(zoos=["digits_inr", "imagenet_inr"]))
    proc = run("dvc repro fetch@imagenet_inr", repo, check=False)
    assert proc.returncode != 0
    assert "zoo.imagenet_inr" in proc.stderr + proc.stdout


def test_corrupt_checkpoint_names_the_file_and_keeps_the_old_pack(fetched):
    ckpt = sorted((fetched / "data/raw/digits_inr").rglob("*.pth"))[3]
    original = ckpt.read_bytes()
    before = (fetched / "data/zoos/digits_inr/weights.npy").read_bytes()
    ckpt.write_bytes(original[: len(original) // 2])
    try:
        proc = run("python -m stages.pack digits_inr", fetched, check=False)
    finally:
        ckpt.write_bytes(original)
    assert_one_error_line(proc, ckpt.name)
    assert (fetched / "data/zoos/digits_inr/weights.npy").read_bytes() == before  # nothing computed is lost


def test_nan_weights_are_dropped_with_a_count_or_rejected(fetched):
    raw = fetched / "data/raw/digits_cnn/weights.npy"
    original = raw.read_bytes()
    weights = np.load(raw)
    weights[-1, 5] = np.nan  # the last row is a final checkpoint of the last run
    np.save(raw, weights)
    try:
        proc = run("python -m stages.pack digits_cnn", fetched)
        assert "1 dropped as non-finite" in proc.stdout
        params = yaml.safe_load((fetched / "params.yaml").read_text())
        params["zoo"]["digits_cnn"]["pack"]["nonfinite"] = "error"
        (fetched / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        proc = run("python -m stages.pack digits_cnn", fetched, check=False)
        assert_one_error_line(proc, "weights.npy", "non-finite")
    finally:
        raw.write_bytes(original)
        params = yaml.safe_load((fetched / "params.yaml").read_text())
        params["zoo"]["digits_cnn"]["pack"]["nonfinite"] = "drop"
        (fetched / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

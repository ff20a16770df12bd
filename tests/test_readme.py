"""The README's Python example runs as written, against a project root that is not the current folder."""

import os
import re

import pytest

from conftest import ROOT, tiny_params
from test_resume import make_project

pytestmark = pytest.mark.slow


def readme_example():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_api_example_runs_from_another_folder(tmp_path, monkeypatch):
    from probegen import config, experiment

    root = make_project(tmp_path / "project", epochs=2)
    params = config.load_params(root / "params.yaml")
    experiment.run(params, "digits_inr", "probegen", root=root, progress=False)  # a pipeline run to load
    monkeypatch.chdir(tmp_path)  # elsewhere: every path must come from `root`
    code = readme_example().replace('root = "."', f'root = {str(root)!r}')
    assert f"root = {str(root)!r}" in code
    printed = []
    exec(compile(code, "README.md", "exec"), {"print": lambda *a, **k: printed.append(" ".join(map(str, a)))})
    assert len(printed) == 2 and "test accuracy" in printed[0] and "probes carry" in printed[1]
    assert (root / "metrics/localize/digits_inr.json").exists() and not (tmp_path / "metrics").exists()
    assert os.getcwd() == str(tmp_path)

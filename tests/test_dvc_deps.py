"""The training stages' DVC deps cover the code a training run imports: an edit to any module that can change
a result reruns the stages it affects (and, the other way round, only those: a stage imports its own
method's module, never another method's)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from probegen.methods import METHODS, available

ROOT = Path(__file__).resolve().parents[1]
# Imported by every stage, but no result depends on them: error reporting, atomic file writes, the memory
# policy (the same kernels on the same numbers), package markers, the fetch stage's downloader.
NOT_RESULTS = {"probegen/__init__.py", "probegen/errors.py", "probegen/io.py", "probegen/runtime.py",
               "probegen/zoo/__init__.py", "probegen/zoo/download.py", "probegen/zoo/sources.py"}

IMPORTS = """
import json, sys
import probegen.cli, probegen.experiment, probegen.runtime
from probegen.methods import METHODS
METHODS[sys.argv[1]]
print(json.dumps(sorted(m.__file__ for name, m in sys.modules.items()
                        if name.split(".")[0] == "probegen" and getattr(m, "__file__", None))))
"""


def stage_deps(kind, name):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][kind]["deps"]
    return [d.replace("${item.method}", name) for d in deps]


@pytest.mark.parametrize("name", available())
def test_a_training_stage_depends_on_every_module_that_can_change_its_results(name):
    out = subprocess.run([sys.executable, "-c", IMPORTS, name], capture_output=True, text=True, check=True, cwd=ROOT)
    imported = {Path(f).resolve().relative_to(ROOT).as_posix() for f in json.loads(out.stdout)}
    deps = stage_deps(METHODS[name].kind, name)
    covered = {f for f in imported if any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)}
    assert imported - covered - NOT_RESULTS == set(), f"{name}: imported but not a DVC dep of its stage"
    others = {f"probegen/methods/{m}.py" for m in available() if m != name}
    assert not imported & others  # another method's edit must not touch this stage

"""probe@<zoo>-<method> and weights@<zoo>-<method>: train every seed of one method on one zoo
-> models/<zoo>/<method>/

Run from the project root as `python -m stages.train ...` (what dvc.yaml does), so that this checkout's
probegen is the one imported. The parameters it reads and the work it does: probegen/cli.py, `train`.
"""

from probegen.cli import stage

if __name__ == "__main__":
    stage("train")

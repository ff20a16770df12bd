"""split@<zoo>: data/zoos/<zoo>/ -> data/splits/<zoo>.json ({train, val, test}: row indices)

Run from the project root as `python -m stages.split ...` (what dvc.yaml does), so that this checkout's
probegen is the one imported. The parameters it reads and the work it does: probegen/cli.py, `split`.
"""

from probegen.cli import stage

if __name__ == "__main__":
    stage("split")

"""pack@<zoo>: data/raw/<zoo>/ -> data/zoos/<zoo>/ (weights.npy, offsets.npy, labels.npy, meta.csv, spec.json)

Run from the project root as `python -m stages.pack ...` (what dvc.yaml does), so that this checkout's
probegen is the one imported. The parameters it reads and the work it does: probegen/cli.py, `pack`.
"""

from probegen.cli import stage

if __name__ == "__main__":
    stage("pack")

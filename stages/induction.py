"""induction: train tiny attention-only transformers and path-patch their induction mechanism
-> metrics/induction.json, plots/induction.png

Run from the project root as `python -m stages.induction ...` (what dvc.yaml does), so that this checkout's
probegen is the one imported. The parameters it reads and the work it does: probegen/cli.py, `induction`.
"""

from probegen.cli import stage

if __name__ == "__main__":
    stage("induction")

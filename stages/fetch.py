"""fetch@<zoo>: the raw zoo in its published format -> data/raw/<zoo>/

Run from the project root as `python -m stages.fetch ...` (what dvc.yaml does), so that this checkout's
probegen is the one imported. The parameters it reads and the work it does: probegen/cli.py, `fetch`.
"""

from probegen.cli import stage

if __name__ == "__main__":
    stage("fetch")

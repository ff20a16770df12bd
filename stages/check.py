"""check: validate params.yaml before any other stage runs -> data/params.ok

Run from the project root as `python -m stages.check ...` (what dvc.yaml does), so that this checkout's
probegen is the one imported. The parameters it reads and the work it does: probegen/cli.py, `check`.
"""

from probegen.cli import stage

if __name__ == "__main__":
    stage("check")

"""aggregate: the summary over zoos x methods x seeds -> metrics/summary.{json,md}, plots/summary/

Run from the project root as `python -m stages.aggregate ...` (what dvc.yaml does), so that this checkout's
probegen is the one imported. The parameters it reads and the work it does: probegen/cli.py, `aggregate`.
"""

from probegen.cli import stage

if __name__ == "__main__":
    stage("aggregate")

"""localize@<zoo>: path patching on the trained prober: which probes and which layers of the probed
networks carry its prediction -> metrics/localize/<zoo>.json, plots/localize/<zoo>/

Run from the project root as `python -m stages.localize ...` (what dvc.yaml does), so that this checkout's
probegen is the one imported. The parameters it reads and the work it does: probegen/cli.py, `localize`.
"""

from probegen.cli import stage

if __name__ == "__main__":
    stage("localize")

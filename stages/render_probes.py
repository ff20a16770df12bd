"""render_probes: the Dead-Leaves pool -> data/probes/dead_leaves.npy (float32 (P, 3, R, R) in [0, 1])

Run from the project root as `python -m stages.render_probes ...` (what dvc.yaml does), so that this checkout's
probegen is the one imported. The parameters it reads and the work it does: probegen/cli.py, `render-probes`.
"""

from probegen.cli import stage

if __name__ == "__main__":
    stage("render-probes")

"""render_probes: the Dead-Leaves pool -> data/probes/dead_leaves.npy (float32 (P, 3, R, R) in [0, 1])"""

from probegen import config
from probegen.errors import cli
from probegen.io import write_npy
from probegen.probes.dead_leaves import render


@cli
def main():
    cfg = config.dead_leaves_config(config.load_params())
    pool = render(cfg["pool_size"], resolution=cfg["resolution"], seed=cfg["seed"])
    write_npy("data/probes/dead_leaves.npy", pool)
    print(f"render_probes: {pool.shape}")


if __name__ == "__main__":
    main()

"""figures.save: the same figure gives the same bytes, run after run (DVC hashes the committed plots)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from probegen.figures import save  # noqa: E402


def test_saving_the_same_figure_twice_gives_identical_files(tmp_path, monkeypatch):
    for name, clock in (("a", "0"), ("b", "1000000000")):  # years apart: no timestamp may reach the file
        monkeypatch.setenv("SOURCE_DATE_EPOCH", clock)
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [1, 0, 2], label="x")
        ax.legend()
        save(fig, tmp_path / name)
    for ext in ("png", "pdf"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes(), ext

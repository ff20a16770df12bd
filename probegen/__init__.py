"""probegen: ProbeGen and weight-space baselines as a DVC pipeline, plus path patching."""

__version__ = "0.1.0"

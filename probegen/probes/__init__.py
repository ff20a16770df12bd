"""Probes: deep linear generators, free and fixed probes, the Dead-Leaves renderer."""

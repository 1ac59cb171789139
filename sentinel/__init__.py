"""Sentinel: a sidecar that keeps Mixture-of-Experts inference alive on GPU hosts."""

__version__ = "0.1.0"

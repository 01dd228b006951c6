"""Reimplemented PTQ baselines for diffusion models, on gaq's shared machinery."""

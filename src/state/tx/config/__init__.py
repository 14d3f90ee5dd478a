"""Composing and checking the Hydra config of `state tx train`."""

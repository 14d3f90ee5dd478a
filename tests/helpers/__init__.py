"""Helpers shared by the tests (synthetic data, TOML split files)."""

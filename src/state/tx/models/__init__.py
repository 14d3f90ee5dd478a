"""LightningModules of the tx models (State Transition and the baselines)."""

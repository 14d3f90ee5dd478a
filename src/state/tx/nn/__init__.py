"""Plain ``torch.nn`` building blocks of the State Transition model (no Lightning imports)."""

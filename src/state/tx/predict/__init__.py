"""`state tx predict`: evaluating a run on its test split."""

"""`state tx infer`: input edits, the loaded predictor and the set simulation."""

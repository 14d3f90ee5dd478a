"""`state tx train`: the training run, its callbacks and FLOPs accounting."""

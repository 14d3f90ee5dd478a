"""Training data: the cell-load data module, input checks and the obsm row cache."""

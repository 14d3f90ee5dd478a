"""State Embedding (SE) model: fit, transform, query, preprocess, eval."""

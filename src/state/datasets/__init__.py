"""Small synthetic perturbation data sets for tests, examples and benchmarks."""

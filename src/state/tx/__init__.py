"""State Transition (ST) models: data, models, training, prediction and inference."""

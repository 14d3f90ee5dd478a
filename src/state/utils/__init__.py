"""Small shared utilities: errors, logging, progress bars."""

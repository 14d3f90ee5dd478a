"""File I/O that never loses user data and never executes code from a file."""

"""Domain models and services of Linli, free of any web framework."""

"""toolkit: one YAML recipe from a labelled text-classification dataset to a small, fast, verified model."""

__version__ = "0.1.0"

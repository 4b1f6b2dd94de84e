"""Metrics and the evaluator (validation, generation, best-model tracking)."""

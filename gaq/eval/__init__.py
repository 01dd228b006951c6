"""Evaluation: feature extractors, image metrics and paired metrics."""

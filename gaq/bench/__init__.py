"""Benchmarking: specs and the runner, provenance, MLflow tracking, Parquet results, tables, plots.

Parquet files under ``results/<benchmark>/`` are the source of truth; tables and plots are
regenerated from them alone, and MLflow is only where people browse runs.
"""

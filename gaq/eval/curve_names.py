"""Names of the per-timestep curves the runner records, shared by the code that measures
them (:mod:`gaq.eval.eps`) and the tables and plots that read them back; torch-free, so
regenerating reports from Parquet does not import torch."""

UNCORRECTED = "_uncorrected"  # suffix of a curve measured before the method's sampler hook

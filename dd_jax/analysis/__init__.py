"""The paper's analysis of test outputs: per-frame errors, finger visibility, per-click force
results, statistics, and the report (tables, CSV, figures) that `tools/report.py` writes."""

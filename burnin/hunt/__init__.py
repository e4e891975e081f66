"""Regression hunting: the run history (SQLite), comparisons of two sets of runs, triage of failures,
shrinking a failing scenario, and `git bisect` support."""

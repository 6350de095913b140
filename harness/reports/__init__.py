"""Reports on a run's tidy results: plots, scaling analysis, compare, README, and the studies.

Modules, one job each: `data` (load and select rows), `tables` (rich / markdown rendering),
`plots` (figures into the run's `plots/`), `analysis` (slopes, crossovers), `compare` (two
runs, regressions), `readme` (the README results section), `study` (the registry that
question-specific analyses of the top-level `studies` package plug into), `cli` (entry).
"""

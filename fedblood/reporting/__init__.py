"""Reports, tables and figures of a run, a seed sweep and a privacy study."""

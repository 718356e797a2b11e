"""Pure consent rules: the per-patient registry (a fold of events), decisions, Mitz parsing."""

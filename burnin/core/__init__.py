"""The ground floor: what both sides of the process boundary stand on (the event log, atomic files,
process state and death signals, the run directory's layout). Imports nothing of burnin above it."""

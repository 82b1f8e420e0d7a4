"""Reliability tests (issue 16, "Lose or corrupt state"): checkpoints that survive any kill, locked runs, a history
that never blocks training, durable atomic writes."""

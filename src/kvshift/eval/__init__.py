"""Evaluation: learned-shift tables and head scores, copying probes on real text (the lm-evaluation-harness
adapter is the `kvshift eval` command)."""

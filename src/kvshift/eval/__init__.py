"""lm-evaluation-harness integration: the `kvshift eval` command."""

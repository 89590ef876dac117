"""Agent job completion time under five KV placement policies (see run.py)."""

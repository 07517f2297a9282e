"""Checkpoint utilities of convit_ssl (pure functions over state dicts)."""

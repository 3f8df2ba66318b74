"""Trace, IR, pass pipeline and artifact writer."""

"""Structured pruning: group importance, unit selection, physical removal."""

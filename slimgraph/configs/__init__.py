"""Packaged transformers config JSONs (used by ``hf-config:NAME``)."""

"""Testbed: real text corpora and tools for exercising migrations beyond the toy world."""

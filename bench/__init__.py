"""Benchmarks that print JSON (`longer bench ...`)."""

"""A/B traffic replay (`longer replay`): requests rebuilt from a behaviour log, arms assigned by a
salted stable hash, and statistics with bootstrap confidence intervals resampled by user.

This package holds the pure parts (traffic reconstruction, assignment, statistics); the HTTP
and in-process replay drivers and the report build on them.
"""

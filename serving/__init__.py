"""FastAPI scoring service, model runtime, user-state (KV) cache and replay tool.

Not implemented yet: arrives with the serving issue.
"""

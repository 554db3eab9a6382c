"""LONGER: the model (pure torch + TorchRec modules; no files, HTTP, Redis or process groups).

The model itself arrives with its own issue; this package already exists so that the
dependency direction `serving -> trainer -> longer <- feature_store` holds from the start.
"""

__version__ = "0.1.0"

"""The online half: the FastAPI scoring service and the A/B traffic replay.

`create_app` (app.py) assembles the routes (routes.py) over the shared `Service` (service.py):
the model runtime (runtime.py: a bundle's encode/score split), the online store
(feature_store/online.py) and the user-state cache policy (state_cache.py), with metrics
(metrics.py), request limits (limits.py), error answers (errors.py) and settings from the
environment (settings.py). `longer serve` runs it (server.py); replay/ drives logged traffic
against several arms and writes the A/B report. Imports trainer/ (bundles), feature_store/ and
longer/; nothing below imports it.
"""

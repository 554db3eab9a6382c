"""TorchRec training: sharding plan, pipeline, optimizers, metrics, checkpoint/resume, export.

Not implemented yet: arrives with the trainer issue.
"""

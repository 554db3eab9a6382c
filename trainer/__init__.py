"""TorchRec training of the model in longer/ on the data of feature_store/.

`Trainer` (train.py) runs setup → resume → steps → evaluate → export: TorchRec's
TrainPipelineSparseDist over a sharding plan (sharding.py), fused embedding optimizers and
AdamW for dense weights, one process or several (distributed.py, `torchrun -m trainer`),
checkpoints with manifests for exact resume (checkpoint.py), metrics and `longer eval`
(evaluate.py, metrics.py) and the model bundle that serving loads (export.py). Configuration:
config.py; command line: cli.py. Imports longer/ and feature_store/, never serving/ or the CLI.
"""

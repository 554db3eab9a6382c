"""LONGER: the model (pure torch + TorchRec modules; no files, HTTP, Redis or process groups).

One concept per module: `config` (ModelConfig), `embedding` (SparseEmbedding), `tokens`
(Tokenizer), `interface` (UserState, Candidates, the DenseNet encode/score protocol),
`modules` (RMSNorm, FFN, Head), `model` (Longer), `baselines`, `recmodel` (RecModel,
build_model) and `flops`. The dependency direction is `serving -> trainer -> longer <- feature_store`.
"""

__version__ = "0.1.0"

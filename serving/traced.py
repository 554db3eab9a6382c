"""The candidate side of a bundle as one TorchScript graph: a scoring call that takes the GIL
once, not once per op.

Why. `ModelRuntime.score` on LONGER (d 64, 2 layers, 500 candidates) runs ~290 torch ops, and
every op lets go of the GIL and takes it back. In the server the event loop thread parses the
next request (JSON, pydantic) while a scoring thread runs, and each of the scoring thread's
ops then waits for the loop to hand the GIL back (CPython hands it over at its switch interval
or a blocking call). A traced graph runs all its ops
in TorchScript's interpreter with the GIL released for the whole call.
`scripts/score_concurrency.py` (one process, L 2,000, 500 candidates, 1 torch thread a call,
medians of 3): scores/s of one thread, two, and two beside a thread parsing score bodies a
fifth of the time — eager 143 / 244 / 178, traced 153 / 293 / 198. Through HTTP with the
heap frozen (serving/heap.py), 8 clients got 1.3–1.4× one client's requests/s eager and
1.5× traced.

What is traced: `DenseNet.score_tokens` (the state's tensors, the candidate tokens and the
request time in; logits out), as a function whose weights are the graph's constants (the
serving model's parameters are set not to require grad; tracing a function takes 15 ms where
tracing the net as a module, every submodule scripted, took 130). The embedding lookup and the Tokenizer before it
(`RecModel.candidate_tokens`, ~50 ops, 0.2 ms) stay eager: a list column's ids have lengths
that depend on the values, which a trace would freeze.

Contract. A trace records the ops of one call, so a Python branch on a shape or a value is
frozen at the traced example. `trace_score` therefore traces one example and checks the graph
against the eager net on others — fewer and more candidates, a shorter and an empty history,
other request times — and returns None (the runtime stays eager and logs why) unless every
logit agrees within `TOLERANCE`. The examples are synthetic histories in the bundle's own
layout, encoded by the bundle's model. CPU only; `LONGER_TRACE=false` turns it off.

Why TorchScript, which torch 2.x marks deprecated: its successors that also run a whole graph
without the GIL (torch.export + AOTInductor) compile C++ when a bundle loads, so a serving
image would have to carry a compiler; `torch.compile`'s graphs run from Python wrapper code.
A torch without `torch.jit.trace` fails the trace, and the runtime scores eagerly.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from feature_store.online import packed_layout
from longer.interface import Candidates, UserState

log = logging.getLogger("longer.serving.runtime")

TOLERANCE = 1e-6  # |traced - eager| per logit, at most (the same ops run: measured 0.0)
# (history events as a fraction of max_len, candidates): the first is traced, all are checked
EXAMPLES = ((1.0, 3), (0.3, 8), (0.0, 1))

Scorer = Callable[[UserState, Candidates], torch.Tensor]


class TracedScore:
    """`RecModel.score` with `DenseNet.score_tokens` run as a traced graph."""

    def __init__(self, model, graph: torch.jit.ScriptFunction):
        self.model, self.graph = model, graph

    def __call__(self, state: UserState, cands: Candidates) -> torch.Tensor:
        return self.graph(state.tensors, self.model.candidate_tokens(state, cands), cands.ts)


def _events(runtime, n: int, seed: int) -> np.ndarray:
    """n synthetic events in the bundle's layout without its list columns (empty lists)."""
    spec = runtime.spec
    dtype = packed_layout([c for c in spec.sequence if not spec.is_list(c)])
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, dtype)
    for name in dtype.names:
        ev[name] = rng.integers(0, 2 if name == "label" else 50, n)
    ev["ts"] = 1_700_000_000 + np.sort(rng.integers(0, 10**6, n))
    return ev


def _example(runtime, share: float, n_cands: int, seed: int):
    """(state, candidates) of a synthetic user with max_len × `share` events."""
    from .runtime import CandidateColumns

    events = _events(runtime, int(runtime.max_len * share), seed)
    state = runtime.encode(seed, events)
    ts = int(events["ts"][-1]) + 60 if len(events) else 1_700_000_000
    ids = np.random.default_rng(seed).integers(0, 50, n_cands).tolist()
    return state, runtime.candidates(CandidateColumns(ids), {}, ts)[0]


def trace_score(runtime) -> Scorer | None:
    """The runtime's model's `score` with its candidate side traced, checked on EXAMPLES (module
    docstring); None where it cannot be traced or disagrees with the eager net anywhere."""
    model = runtime.bundle.model
    if any(p.device.type != "cpu" for p in model.parameters()):
        return None
    t0 = time.perf_counter()
    try:
        examples = [_example(runtime, share, n, seed) for seed, (share, n) in enumerate(EXAMPLES)]
        with runtime.slots():
            inputs = [(s.tensors, model.candidate_tokens(s, c), c.ts) for s, c in examples]
            net = model.requires_grad_(False).net  # a serving model's weights: the graph's constants

            def score_tokens(state: dict[str, torch.Tensor], cand: torch.Tensor, request_ts: torch.Tensor):
                return net.score_tokens(UserState(dict(state)), cand, request_ts)

            with warnings.catch_warnings():  # torch.jit.trace's deprecation: the module docstring
                warnings.simplefilter("ignore", DeprecationWarning)
                graph = torch.jit.trace(score_tokens, inputs[0], strict=False, check_trace=False)
            eager = [model.net.score_tokens(UserState(s), c, ts) for s, c, ts in inputs]
            worst = max(float((graph(*x) - e).abs().max()) for x, e in zip(inputs, eager))
    except Exception as e:  # noqa: BLE001 - any failure to trace leaves the eager model in place
        log.warning("scoring eagerly: the candidate side did not trace (%s: %s)", type(e).__name__, e)
        return None
    if not worst <= TOLERANCE:
        log.warning("scoring eagerly: the traced candidate side differs from the model by %.3g", worst)
        return None
    log.info(
        "candidate side traced in %.2f s (checked on %d shapes)", time.perf_counter() - t0, len(EXAMPLES)
    )
    return TracedScore(model, graph)

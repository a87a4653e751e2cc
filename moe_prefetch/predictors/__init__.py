"""Expert predictors: one module per architecture, each registering its class with `@register_arch` (base.py).
Importing this package imports every architecture module below, so `ARCHITECTURES` holds them all (the params
schema orders their train.<arch> sections by name, whatever the import order):

  frequency, lookup         count tables (tables.py)
  speculation_transformer   transformer over per-layer context tokens
  mlp                       embeddings of all context slots + target layer -> MLP
  token_mlp                 the same plus the token id's embedding (windows.token_ids)
  lstm                      LSTM over the context layers as a sequence
  layer_specific            shared MLP trunk, one output head per target layer
  multiscale                several context lengths encoded separately, fused by bounded gate weights
  ensemble                  learned per-layer mix of other architectures' log-probabilities
  hybrid                    multi-label current-token head + temporal head for the next tokens at the same layer
  hidden_mlp                MLP on the hidden state entering the last context layer (needs captured hidden states)

The common interface and checkpoint format are in base.py, the shared training loop of the neural ones in
neural.py, their shared building blocks in layers.py.
"""

from moe_prefetch.predictors import (  # noqa: F401  (imported to register the architectures)
    ensemble,
    hidden_mlp,
    hybrid,
    layer_specific,
    lstm,
    mlp,
    multiscale,
    speculation_transformer,
    tables,
    token_mlp,
)
from moe_prefetch.predictors.base import (
    ARCHITECTURES,
    Predictor,
    load_predictor,
    register_arch,
)
from moe_prefetch.predictors.tables import FrequencyPredictor, LookupPredictor

__all__ = ["ARCHITECTURES", "FrequencyPredictor", "LookupPredictor", "Predictor", "load_predictor", "register_arch"]

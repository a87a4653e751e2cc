"""Expert predictors: one module per architecture; `ARCHITECTURES` maps each `train.arch` name to its class.
The common interface and checkpoint format are in stages/predictors/base.py, the shared training loop of the
neural ones in stages/predictors/neural.py, their shared building blocks in stages/predictors/layers.py.

  frequency, lookup         count tables (tables.py)
  speculation_transformer   transformer over per-layer context tokens
  mlp                       embeddings of all context slots + target layer -> MLP
  lstm                      LSTM over the context layers as a sequence
  layer_specific            shared MLP trunk, one output head per target layer
  multiscale                several context lengths encoded separately, fused by bounded gate weights
  hybrid                    multi-label current-token head + temporal head for the next tokens at the same layer
  hidden_mlp                MLP on the hidden state entering the last context layer (needs captured hidden states)
  ensemble                  learned per-layer mix of other architectures' log-probabilities
"""

from stages.predictors.base import Predictor, load_predictor
from stages.predictors.ensemble import EnsemblePredictor
from stages.predictors.hidden_mlp import HiddenMLPPredictor
from stages.predictors.hybrid import HybridPredictor
from stages.predictors.layer_specific import LayerSpecificPredictor
from stages.predictors.lstm import LSTMPredictor
from stages.predictors.mlp import MLPPredictor
from stages.predictors.multiscale import MultiscalePredictor
from stages.predictors.speculation_transformer import SpeculationTransformerPredictor
from stages.predictors.tables import FrequencyPredictor, LookupPredictor

ARCHITECTURES: dict[str, type[Predictor]] = {
    cls.arch: cls
    for cls in (
        FrequencyPredictor, LookupPredictor, SpeculationTransformerPredictor, MLPPredictor, LSTMPredictor,
        LayerSpecificPredictor, MultiscalePredictor, HybridPredictor, HiddenMLPPredictor, EnsemblePredictor,
    )
}

__all__ = ["ARCHITECTURES", "FrequencyPredictor", "LookupPredictor", "Predictor", "load_predictor"]

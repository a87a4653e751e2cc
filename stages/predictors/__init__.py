"""Expert predictors: one module per architecture; `ARCHITECTURES` maps each `train.arch` name to its class.
The common interface and checkpoint format are in stages/predictors/base.py."""

from stages.predictors.base import Predictor, load_predictor
from stages.predictors.speculation_transformer import SpeculationTransformerPredictor
from stages.predictors.tables import FrequencyPredictor, LookupPredictor

ARCHITECTURES: dict[str, type[Predictor]] = {
    cls.arch: cls for cls in (FrequencyPredictor, LookupPredictor, SpeculationTransformerPredictor)
}

__all__ = ["ARCHITECTURES", "Predictor", "load_predictor"]

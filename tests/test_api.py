"""The public API (moe_prefetch.api): predicting from routed sets gives exactly the scores the evaluate stage
computes on the windows of the same tokens (no train/serve skew), and bad queries are one-line errors."""

from __future__ import annotations

import numpy as np
from conftest import assert_error

from moe_prefetch.api import (
    known_windows,
    load_predictor,
    predict_experts,
    read_routing,
    read_windows,
)


def test_predict_from_routed_sets_equals_the_offline_scores(tiny):
    routing = read_routing(tiny.shards)
    test = read_windows(tiny.windows, "test")
    row_of = {(routing.sequence_ids[s], int(p)): row for row, (s, p) in enumerate(zip(routing.sequence_index, routing.position))}
    for path in (tiny.predictor, tiny.lookup):
        predictor = load_predictor(path)
        h = predictor.geometry["horizon"]
        target = int(test.target_layer[0])
        windows = test.subset(np.flatnonzero(test.target_layer == target)[:200])
        rows = [row_of[(windows.sequence_ids[s], int(p))] for s, p in zip(windows.sequence_index, windows.position)]
        experts, scores = predict_experts(predictor, routing.experts[rows, : target - h + 1], layer=target - h, m=3)
        offline, _ = predictor.score(windows)
        np.testing.assert_allclose(scores, offline, rtol=1e-6, atol=1e-7)
        assert experts.shape == (len(rows), 3)
        assert (experts[:, 0] == offline.argmax(axis=1)).all()


def test_unpredictable_layers_and_bad_shapes_are_one_line_errors(tiny):
    predictor = load_predictor(tiny.lookup)
    g = predictor.geometry
    routed = np.zeros((2, g["num_layers"], g["top_k"]), dtype=np.int16)
    assert_error(lambda: known_windows(g, routed, layer=g["context_length"] - 2), "layer:", "accepted: ")
    assert_error(lambda: known_windows(g, routed, layer=g["num_layers"] - g["horizon"]), "layer:", "accepted: ")
    assert_error(lambda: known_windows(g, routed[:, :, :1], layer=g["context_length"]), "routed:", "expected")


def test_token_mlp_without_token_ids_is_a_one_line_error(tmp_path) -> None:
    from moe_prefetch.config import as_dict
    from moe_prefetch.params import parse_section
    from moe_prefetch.predictors import ARCHITECTURES

    geometry = {"num_experts": 4, "top_k": 1, "num_layers": 3, "context_length": 1, "horizon": 1, "vocab_size": 10}
    predictor = ARCHITECTURES["token_mlp"](geometry, as_dict(parse_section("train", {"arch": "token_mlp"})))
    routed = np.zeros((2, 1, 1), dtype=np.int64)
    weights = np.ones((2, 1, 1), dtype=np.float32)
    assert_error(lambda: predict_experts(predictor, routed, layer=0, routed_weights=weights), "token_id", "predict_experts needs token_id=")
    # the default token_mlp (context_encoding weighted_set) also reads the gate weights
    assert_error(lambda: predict_experts(predictor, routed, layer=0, token_id=np.array([3, 4])), "context_weights",
                 "predict_experts needs routed_weights=")
    scores = predict_experts(predictor, routed, layer=0, token_id=np.array([3, 99]), routed_weights=weights)[1]  # 99: unknown id, no error
    assert scores.shape == (2, 4)

"""Update statistics on hand-made models: norms, cosines with the mean update, dispersion,
model change, and the byte count of messages."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from stamen.common.convert import arrays_to_record
from stamen.server.observe import model_bytes
from stamen.server.update_stats import change_norm, update_statistics


def _model(w: list[float], b: float, steps: int = 0) -> dict[str, np.ndarray]:
    return {
        "w": np.array(w, dtype=np.float32),
        "b": np.array([b], dtype=np.float32),
        "steps": np.array([steps], dtype=np.int64),
    }


def test_figures_match_a_hand_computation() -> None:
    base = _model([0.0, 0.0], 0.0)
    sites = [_model([3.0, 0.0], 4.0, steps=7), _model([0.0, 1.0], 0.0, steps=9)]
    stats = update_statistics(base, sites, [1.0, 3.0])
    u1, u2 = np.array([3.0, 0.0, 4.0]), np.array([0.0, 1.0, 0.0])  # float parameters only: w, b
    mean = (1 * u1 + 3 * u2) / 4
    cos = [float(u @ mean / (np.linalg.norm(u) * np.linalg.norm(mean))) for u in (u1, u2)]
    assert stats["update_norm_mean"] == pytest.approx(3.0)  # norms 5 and 1
    assert stats["update_norm_max"] == pytest.approx(5.0)
    assert stats["update_norm_dispersion"] == pytest.approx(np.std([5.0, 1.0]) / 3.0)
    assert stats["cosine_min"] == pytest.approx(min(cos))
    assert stats["cosine_mean"] == pytest.approx(sum(cos) / 2)
    assert stats["site_update_norms"] == pytest.approx([5.0, 1.0])


def test_agreeing_sites_have_cosine_one_and_no_dispersion() -> None:
    base = _model([1.0, 1.0], 1.0)
    stats = update_statistics(base, [_model([2.0, 2.0], 2.0)] * 3, [5.0, 1.0, 2.0])
    assert stats["cosine_min"] == pytest.approx(1.0) and stats["update_norm_dispersion"] == pytest.approx(0.0)


def test_opposite_sites_score_negative_and_a_zero_mean_update_gives_nan() -> None:
    base = _model([0.0, 0.0], 0.0)
    stats = update_statistics(base, [_model([1.0, 0.0], 0.0), _model([-2.0, 0.0], 0.0)], [1.0, 1.0])
    assert stats["cosine_min"] == pytest.approx(-1.0)
    cancel = update_statistics(base, [_model([1.0, 0.0], 0.0), _model([-1.0, 0.0], 0.0)], [1.0, 1.0])
    assert math.isnan(cancel["cosine_mean"])
    assert update_statistics(base, [], []) == {}


def test_change_norm_ignores_integer_buffers() -> None:
    assert change_norm(_model([0.0, 0.0], 0.0, 1), _model([3.0, 4.0], 0.0, 50)) == pytest.approx(5.0)


def test_model_bytes_counts_array_payloads_of_every_message(serverapp_identity: None) -> None:
    arrays = arrays_to_record({"w": np.zeros((10, 10), dtype=np.float32)})
    messages = [Message(RecordDict({"arrays": arrays}), dst_node_id=n, message_type="train") for n in (1, 2)]
    size = sum(len(a.data) for a in arrays.values())
    assert size >= 400
    assert model_bytes(messages) == 2 * size
    assert model_bytes([Message(RecordDict(), dst_node_id=1, message_type="train")]) == 0

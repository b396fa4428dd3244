"""Scenario files: every field checked with a message naming it; each kind of change really happens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stamen.client.data import simulated_split
from stamen.client.stream import rotate, stream_view
from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.errors import ConfigError
from stamen.common.scenario import BUNDLED_DIR, load_scenario, parse_scenario
from stamen.simulations.run import with_scenario_defaults

SITES = 3


def _cfg(**raw: object) -> StamenConfig:
    return StamenConfig.from_mapping({"dataset": "digits", "partition": "iid", **raw})


def _view(doc: dict, site: int, server_round: int, **raw: object):
    scenario = parse_scenario(doc, "test.yaml")
    cfg = _cfg(**raw)
    train_idx, hold_idx = simulated_split({"partition-id": site, "num-partitions": SITES}, cfg)
    return stream_view(scenario, cfg, site, train_idx, hold_idx, server_round)


@pytest.mark.parametrize("path", sorted(BUNDLED_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_bundled_scenario_is_valid_for_its_data(path: Path) -> None:
    scenario = load_scenario(path.stem)
    assert scenario.name == path.stem
    cfg = StamenConfig.from_mapping(with_scenario_defaults({"scenario": path.stem}))
    data = load_dataset(str(cfg["dataset"]))
    scenario.check_against(data.num_classes, data.input_shape, sites=10)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ([1, 2], "must be a mapping"),
        ({"tasks": {"rounds-per-task": 2, "classes": [[0, 1]]}, "colour": 1}, "unknown field(s) colour"),
        ({}, "neither tasks nor events"),
        ({"tasks": {"rounds-per-task": 0, "classes": [[0]]}}, "tasks.rounds-per-task must be an integer >= 1"),
        ({"tasks": {"rounds-per-task": 2, "classes": [[0, 1], [1, 2]]}}, "puts a class in more than one task"),
        ({"tasks": {"rounds-per-task": 2, "classes": [[0, -1]]}}, "tasks.classes[0][1] must be an integer >= 0"),
        ({"events": [{"kind": "melt", "from-round": 1}]}, "events[0].kind must be one of"),
        ({"events": [{"kind": "join", "sites": [0]}]}, "events[0].from-round must be an integer >= 1"),
        ({"events": [{"kind": "join", "sites": "some", "from-round": 2}]}, "events[0].sites must be 'all'"),
        ({"events": [{"kind": "rotate", "from-round": 2, "degrees-per-round": 5}]}, "events[0].max-degrees"),
        ({"events": [{"kind": "noise", "from-round": 2, "std-per-round": -1, "max-std": 1}]}, "std-per-round"),
        ({"events": [{"kind": "label-swap", "from-round": 2, "pairs": [[1, 2, 3]]}]}, "events[0].pairs must be"),
        ({"events": [{"kind": "label-swap", "from-round": 2, "pairs": [[1, 2], [2, 3]]}]}, "disjoint pairs"),
        ({"events": [{"kind": "quiet", "from-round": 5, "until-round": 3}]}, "events[0].until-round must be"),
        ({"events": [{"kind": "join", "from-round": 2, "pairs": [[1, 2]]}]}, "unknown field(s) pairs"),
        ({"run-config": {"lr": -1}, "events": [{"kind": "join", "from-round": 2}]}, "run-config: run config 'lr'"),
        ({"run-config": {"lrr": 1}, "events": [{"kind": "join", "from-round": 2}]}, "forbidden key(s) lrr"),
    ],
)
def test_a_bad_scenario_names_the_bad_field(doc: object, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(doc, "bad.yaml")
    assert "scenario bad.yaml" in str(err.value) and field in str(err.value)


def test_a_scenario_is_checked_against_the_data_and_the_sites(tmp_path: Path) -> None:
    scenario = parse_scenario(
        {"events": [{"kind": "label-shift", "sites": [4], "from-round": 2, "keep-classes": [12]}]}, "s"
    )
    with pytest.raises(ConfigError, match=r"classes \[12\] do not exist"):
        scenario.check_against(10, (1, 8, 8))
    shifted = parse_scenario({"events": [{"kind": "join", "sites": [4], "from-round": 2}]}, "s")
    with pytest.raises(ConfigError, match="names site 4, but the simulation has 3 sites"):
        shifted.check_against(10, (1, 8, 8), sites=3)
    rotating = parse_scenario(
        {"events": [{"kind": "rotate", "from-round": 2, "degrees-per-round": 1, "max-degrees": 9}]}, "s"
    )
    with pytest.raises(ConfigError, match="rotates images"):
        rotating.check_against(10, (64,))
    with pytest.raises(ConfigError, match="neither a bundled scenario"):
        load_scenario(str(tmp_path / "absent.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("tasks: [unclosed\n")
    with pytest.raises(ConfigError, match="not readable YAML"):
        load_scenario(str(broken))


def test_class_incremental_tasks_follow_the_rounds() -> None:
    doc = {"tasks": {"rounds-per-task": 2, "classes": [[0, 1], [2, 3], [4, 5]]}}
    for server_round, classes, shard in [
        (1, {0, 1}, "task-1"),
        (2, {0, 1}, "task-1"),
        (3, {2, 3}, "task-2"),
        (6, {4, 5}, "task-3"),
        (9, {4, 5}, "task-3"),
    ]:
        view = _view(doc, 0, server_round)
        assert set(view.y_train.tolist()) == classes, server_round
        assert set(view.y_holdout.tolist()) <= classes
        assert view.shard_names == (shard,)
    # record ids are rows of the dataset: task 1 and task 2 never share one
    assert not set(_view(doc, 0, 1).record_ids) & set(_view(doc, 0, 3).record_ids)


def test_join_quiet_and_label_shift_change_only_the_named_sites_from_their_round() -> None:
    doc = {
        "events": [
            {"kind": "join", "sites": [1], "from-round": 3},
            {"kind": "quiet", "sites": [2], "from-round": 2, "until-round": 3},
            {"kind": "label-shift", "sites": [0], "from-round": 4, "keep-classes": [0, 1, 2]},
        ]
    }
    full = [_view(doc, s, 1).num_train for s in range(SITES)]
    assert full[0] > 0 and full[2] > 0
    joined = [_view(doc, 1, r) for r in (1, 2, 3)]
    assert [v.num_train for v in joined[:2]] == [0, 0] and joined[0].num_holdout == 0
    assert joined[2].num_train > 0 and joined[2].num_holdout > 0
    quiet = [_view(doc, 2, r) for r in (1, 2, 3, 4)]
    assert [v.num_train for v in quiet] == [full[2], 0, 0, full[2]]
    assert quiet[1].num_holdout == quiet[0].num_holdout > 0  # a quiet site can still evaluate
    assert set(_view(doc, 0, 3).y_train.tolist()) == set(range(10))
    assert set(_view(doc, 0, 4).y_train.tolist()) == {0, 1, 2}


def test_label_swap_exchanges_labels_of_the_same_inputs() -> None:
    doc = {"events": [{"kind": "label-swap", "sites": [0], "from-round": 2, "pairs": [[1, 7]]}]}
    before, after = _view(doc, 0, 1), _view(doc, 0, 2)
    assert torch.equal(before.x_train, after.x_train)
    old, new = before.y_train, after.y_train
    assert torch.equal(new[old == 1], torch.full_like(new[old == 1], 7))
    assert torch.equal(new[old == 7], torch.full_like(new[old == 7], 1))
    same = (old != 1) & (old != 7)
    assert torch.equal(new[same], old[same])
    assert torch.equal(_view(doc, 1, 2).y_train, _view(doc, 1, 1).y_train)  # another site: unchanged


def test_rotation_and_noise_grow_with_the_rounds_and_are_reproducible() -> None:
    doc = {
        "events": [
            {"kind": "rotate", "sites": [0], "from-round": 2, "degrees-per-round": 30, "max-degrees": 60},
            {"kind": "noise", "sites": [1], "from-round": 2, "std-per-round": 0.1, "max-std": 0.2},
        ]
    }
    base = _view(doc, 0, 1).x_train
    diffs = [float((_view(doc, 0, r).x_train - base).abs().mean()) for r in (2, 3, 4)]
    assert 0 < diffs[0] < diffs[1] == pytest.approx(diffs[2])  # 30, 60, then capped at 60 degrees
    assert torch.equal(_view(doc, 0, 3).x_train, rotate(base, 60.0))
    noisy_base = _view(doc, 1, 1).x_train
    spreads = [float((_view(doc, 1, r).x_train - noisy_base).std()) for r in (2, 3, 4)]
    assert spreads[0] == pytest.approx(0.1, rel=0.1) and spreads[1] == pytest.approx(0.2, rel=0.1)
    assert spreads[2] == pytest.approx(0.2, rel=0.1)
    assert torch.equal(_view(doc, 1, 3).x_train, _view(doc, 1, 3).x_train)  # seeded: same view twice


def test_rotating_a_digit_by_a_quarter_turn_moves_its_pixels() -> None:
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 1, 3:5] = 1.0  # a bar near the top
    turned = rotate(image, 90.0)
    assert float(turned[0, 0, :2].sum()) < 0.5  # no longer at the top
    assert float(turned.sum()) == pytest.approx(2.0, rel=0.35)
    assert np.allclose(rotate(image, 0.0).numpy(), image.numpy(), atol=1e-6)


def test_scenario_run_config_gives_defaults_that_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("run-config: {dataset: digits, num-server-rounds: 7}\nevents: [{kind: join, from-round: 2}]\n")
    raw = with_scenario_defaults({"scenario": str(path), "num-server-rounds": 3})
    assert raw == {"dataset": "digits", "num-server-rounds": 3, "scenario": str(path.resolve())}
    assert with_scenario_defaults({"scenario": "split-mnist"})["scenario"] == "split-mnist"

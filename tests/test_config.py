"""The run-config table: in step with pyproject.toml, coerced from strings, ranges enforced by name."""

from __future__ import annotations

import tomllib
from dataclasses import FrozenInstanceError
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import pytest

from stamen.common.config import KEY_BY_NAME, KEYS, StamenConfig, parse_assignment
from stamen.common.errors import ConfigError
from stamen.server.app import resolve_out_dir

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@pytest.fixture(scope="module")
def app_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]``: the defaults Flower hands the ServerApp."""
    with PYPROJECT.open("rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


# --- pyproject.toml -----------------------------------------------------------------------


def test_pyproject_lists_exactly_the_known_keys(app_config: dict[str, Any]) -> None:
    assert sorted(set(app_config) - set(KEY_BY_NAME)) == []  # in pyproject, unknown to stamen
    assert sorted(set(KEY_BY_NAME) - set(app_config)) == []  # known to stamen, missing from pyproject


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_pyproject_default_matches_the_table(app_config: dict[str, Any], key: Any) -> None:
    value = app_config.get(key.name)
    assert type(value) is key.type, f"{key.name}: pyproject has {value!r}, the table is {key.type.__name__}"
    assert value == key.default


def test_pyproject_config_resolves_to_the_defaults(app_config: dict[str, Any]) -> None:
    assert StamenConfig.from_mapping(app_config).as_dict() == StamenConfig.from_mapping({}).as_dict()


def test_defaults_pass_their_own_checks_and_keys_are_unique() -> None:
    assert len(KEY_BY_NAME) == len(KEYS)
    for key in KEYS:
        assert isinstance(key.default, key.type), key.name
        assert key.check is None or key.check(key.default), key.name
        assert key.check is None or key.expect, f"{key.name} has a check but no 'expect' text"


def test_as_dict_is_in_table_order() -> None:
    assert list(StamenConfig.from_mapping({}).as_dict()) == [k.name for k in KEYS]


# --- coercion -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("server-eval", "true", True),
        ("server-eval", "False", False),
        ("server-eval", "yes", True),
        ("server-eval", "0", False),
        ("nesterov", True, True),
        ("num-server-rounds", "3", 3),
        ("num-server-rounds", 3.0, 3),
        ("fraction-train", "0.5", 0.5),
        ("lr", "1e-3", 0.001),
        ("lr", 1, 1.0),
        ("dataset", "npz:/data/x.npz", "npz:/data/x.npz"),
    ],
)
def test_values_are_coerced_to_the_key_type(key: str, raw: Any, expected: Any) -> None:
    value = StamenConfig.from_mapping({key: raw})[key]
    assert value == expected
    assert type(value) is KEY_BY_NAME[key].type


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("server-eval", "maybe"),
        ("server-eval", 1),
        ("num-server-rounds", "3.5"),
        ("num-server-rounds", 2.5),
        ("num-server-rounds", "three"),
        ("lr", "fast"),
        ("lr", True),
        ("lr", None),
    ],
)
def test_uncoercible_values_name_the_key(key: str, raw: Any) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        StamenConfig.from_mapping({key: raw})


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="num-rounds"):
        StamenConfig.from_mapping({"num-rounds": 3})


def test_unknown_keys_pass_when_not_strict() -> None:
    cfg = StamenConfig.from_mapping({"other-app-key": 1, "lr": "0.2"}, strict=False)
    assert cfg["lr"] == 0.2
    assert "other-app-key" not in cfg.as_dict()


# --- ranges ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("num-server-rounds", -1),
        ("fraction-train", 0.0),
        ("fraction-train", 1.5),
        ("fraction-evaluate", -0.1),
        ("min-train-sites", 0),
        ("round-timeout", 0),
        ("seed", -1),
        ("alpha", 0),
        ("holdout-fraction", 1.0),
        ("lr", 0),
        ("lr", -0.1),
        ("lr", "nan"),
        ("lr", "inf"),
        ("momentum", 1.0),
        ("weight-decay", -1e-4),
        ("clip-norm", "inf"),
        ("batch-size", 0),
        ("accum-steps", 0),
        ("warmup-rounds", -1),
        ("lr-min-factor", 1.5),
        ("step-gamma", 0),
        ("step-rounds", 0),
        ("partition", "random"),
        ("optimizer", "lion"),
        ("lr-schedule", "linear"),
        ("precision", "fp8"),
        ("device", "tpu"),
        ("strategy", "fedsgd"),
        ("beta-2", 1.0),
        ("tau", 0),
    ],
)
def test_out_of_range_values_name_the_key(key: str, raw: Any) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        StamenConfig.from_mapping({key: raw})


@pytest.mark.parametrize("raw", ["1,x,28", "0,28,28", ",", "-1"])
def test_bad_input_shape_fails_at_construction(raw: str) -> None:
    with pytest.raises(ConfigError, match="input-shape"):
        StamenConfig.from_mapping({"input-shape": raw})


def test_input_shape_parses() -> None:
    assert StamenConfig.from_mapping({"input-shape": " 1, 28,28 "}).input_shape == (1, 28, 28)
    assert StamenConfig.from_mapping({}).input_shape is None


def test_lr_horizon_defaults_to_run_length() -> None:
    assert StamenConfig.from_mapping({"num-server-rounds": 7}).lr_horizon_rounds == 7
    assert StamenConfig.from_mapping({"num-server-rounds": 7, "lr-horizon-rounds": 3}).lr_horizon_rounds == 3


def test_replace_uses_underscores_and_validates() -> None:
    cfg = StamenConfig.from_mapping({"lr": 0.2})
    changed = cfg.replace(num_server_rounds=5)
    assert (changed["num-server-rounds"], changed["lr"], cfg["num-server-rounds"]) == (5, 0.2, 20)
    with pytest.raises(ConfigError, match="'lr'"):
        cfg.replace(lr=0)


# --- --set assignments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr=0.1", ("lr", "0.1")),
        (" lr = 0.1 ", ("lr", "0.1")),
        ("dataset=csv:a=b.csv", ("dataset", "csv:a=b.csv")),  # only the first '=' splits
        ("out-dir=", ("out-dir", "")),
    ],
)
def test_parse_assignment(text: str, expected: tuple[str, str]) -> None:
    assert parse_assignment(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [("lr", "key=value"), ("lr 0.1", "key=value"), ("num-rounds=3", "num-rounds"), ("=3", "unknown")],
)
def test_parse_assignment_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_assignment(text)


# --- continual runs ---------------------------------------------------------------------------


def test_zero_rounds_means_until_stopped_and_needs_a_cosine_horizon() -> None:
    assert StamenConfig.from_mapping({"num-server-rounds": 0, "lr-schedule": "constant"})["num-server-rounds"] == 0
    assert StamenConfig.from_mapping({"num-server-rounds": 0, "lr-horizon-rounds": 50}).lr_horizon_rounds == 50
    with pytest.raises(ConfigError, match="lr-horizon-rounds >= 1 when rounds are unbounded"):
        StamenConfig.from_mapping({"num-server-rounds": 0})


@pytest.mark.parametrize(("raw", "parsed"), [("", None), ("4:20", (4, 4, 20.0)), (" 3-5:0.5 ", (3, 5, 0.5))])
def test_server_lr_spike_parses(raw: str, parsed: tuple[int, int, float] | None) -> None:
    assert StamenConfig.from_mapping({"server-lr-spike": raw}).server_lr_spike == parsed


@pytest.mark.parametrize("raw", ["4", "a-b:2", "5-3:2", "0-2:2", "3:0", "3:nan", "1-2:3:4"])
def test_a_bad_server_lr_spike_names_the_key(raw: str) -> None:
    with pytest.raises(ConfigError, match="'server-lr-spike'"):
        StamenConfig.from_mapping({"server-lr-spike": raw})


def test_a_resumed_run_stays_in_its_own_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = StamenConfig.from_mapping({"resume-from": str(run)})
    assert resolve_out_dir(cfg) == run.resolve()
    assert resolve_out_dir(cfg.replace(out_dir=str(run))) == run.resolve()
    with pytest.raises(ConfigError, match="resume-from continues the run in its own directory"):
        resolve_out_dir(cfg.replace(out_dir=str(tmp_path / "other")))


def test_every_key_has_a_section_and_each_section_is_typed() -> None:
    from stamen.common.config import SECTION_CLASSES, SECTION_OF, SECTIONS

    assert set(SECTION_OF) == set(KEY_BY_NAME)
    assert set(SECTIONS) == {
        "federation", "continual", "data", "model", "local", "privacy", "server-dp", "trust", "faults",
        "server-optimizer", "observe",
    }  # fmt: skip
    cfg = StamenConfig.from_mapping({"lr": 0.2, "batch-size": 64, "dp": True, "noise-multiplier": 1.1})
    local = cfg.section("local")
    assert (local.lr, local.batch_size) == (0.2, 64)
    assert cfg.section("privacy").noise_multiplier == 1.1
    with pytest.raises(FrozenInstanceError):
        local.lr = 1.0  # type: ignore[misc]
    for section, cls in SECTION_CLASSES.items():
        fields = {f.name: f.type for f in dataclass_fields(cls)}
        expected = {k.name.replace("-", "_"): k.type for k in KEYS if SECTION_OF[k.name] == section}
        assert fields == expected
    with pytest.raises(ConfigError, match="unknown config section"):
        cfg.section("nosuch")


def test_a_site_is_sent_only_its_sections_and_cannot_read_server_keys() -> None:
    from stamen.common.config import SITE_KEYS

    cfg = StamenConfig.from_mapping({"metrics-keyfile": "/srv/key.pem", "metrics-certfile": "/srv/c.pem", "lr": 0.2})
    sent = cfg.site_dict()
    assert set(sent) == SITE_KEYS
    for server_only in ("metrics-keyfile", "metrics-certfile", "resume-from", "out-dir", "round-timeout"):
        assert server_only not in sent
    site = StamenConfig.for_site({**cfg.as_dict(), "server-round": 3})
    assert site["lr"] == 0.2
    with pytest.raises(ConfigError, match="'metrics-keyfile' is a server-side key"):
        site["metrics-keyfile"]
    assert site.replace(lr=0.3)["lr"] == 0.3
    with pytest.raises(ConfigError, match="server-side"):
        site.replace(lr=0.3)["resume-from"]


def test_site_code_reads_only_site_keys() -> None:
    """Every run-config key named in the site's code is one it is sent (a static safety net)."""
    import re

    from stamen.common.config import SITE_KEYS

    root = PYPROJECT.parent
    named: dict[str, str] = {}
    for path in [*(root / "client").glob("*.py"), *(root / "simulations" / "faults").glob("*.py")]:
        for key in re.findall(r"cfg\[\"([a-z0-9-]+)\"\]", path.read_text()):
            named[key] = path.name
    assert named, "the scan found no run-config reads: the pattern is stale"
    assert {k: f for k, f in named.items() if k not in SITE_KEYS} == {}


def test_simulate_options_take_their_help_and_default_from_the_key_table() -> None:
    import typer.main

    from stamen.cli.main import KEY_OPTIONS, app

    params = {p.name: p for p in typer.main.get_command(app).commands["simulate"].params}  # type: ignore[attr-defined]
    assert set(KEY_OPTIONS) <= set(params)
    for param, name in KEY_OPTIONS.items():
        key = KEY_BY_NAME[name]
        assert key.help in params[param].help
        # shown by click as ``[default: (20)]``; the option itself stays unset (None) so a
        # scenario or --set can still give the key its value
        shown = str(key.default).lower() if isinstance(key.default, bool) else str(key.default) or "''"
        assert params[param].show_default == shown, (param, params[param].show_default)
        assert params[param].default is None


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("lr_schedule=step", "run config keys use '-', not '_': did you mean 'lr-schedule'?"),
        ("lr-shedule=step", "did you mean 'lr-schedule'?"),
    ],
)
def test_an_unknown_set_key_suggests_the_key_it_is_probably_a_typo_of(text: str, hint: str) -> None:
    with pytest.raises(ConfigError, match="unknown run config key") as caught:
        parse_assignment(text)
    assert hint in str(caught.value)


def test_unknown_keys_in_a_mapping_get_suggestions_too() -> None:
    with pytest.raises(ConfigError) as caught:
        StamenConfig.from_mapping({"num_server_rounds": 3, "zzz-unheard-of": 1})
    assert "did you mean 'num-server-rounds'?" in str(caught.value)
    assert "'zzz-unheard-of'" in str(caught.value) and "'zzz-unheard-of' (" not in str(caught.value)

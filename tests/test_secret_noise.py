"""DP noise the server cannot rebuild: a site's randomness is its own secret (``dp-noise``).

The server knows the run config, seed included. With ``dp-noise = secret`` it cannot
regenerate a site's DP-SGD noise from it; a redone round draws fresh noise and is charged
again; the site's secret stays in its store (0600) and out of every reply; a real node
refuses ``seeded``.
"""

from __future__ import annotations

import copy
import json
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from clientdrive import OneSite, site_terms

from stamen.client import app as client_app
from stamen.client.app import Instruction
from stamen.client.dp import train_private
from stamen.client.noise import SECRET_ENTRY
from stamen.client.pool import TrainingPool
from stamen.client.train import round_seed
from stamen.common.config import StamenConfig
from stamen.common.convert import load_arrays, record_to_arrays
from stamen.common.datasets import load_dataset
from stamen.common.models import build_model
from stamen.common.runrecord import derive_seeds
from stamen.server.strategy import StamenStrategy

pytestmark = pytest.mark.usefixtures("serverapp_identity")
SITE = "site-0000"


def _site(tmp_path: Path, noise: str, *, real: bool = False) -> OneSite:
    cfg = StamenConfig.from_mapping(
        {"dataset": "digits", "dp": True, "noise-multiplier": 1.0, "min-partition-size": 10, "dp-noise": noise}
    )
    node: dict[str, Any] = {"site-id": SITE, "state-dir": str(tmp_path / "state")}
    if real:
        data = load_dataset("digits")
        np.savez(tmp_path / "site.npz", x=data.x_train[:400], y=data.y_train[:400])
        node |= {"data": f"npz:{tmp_path / 'site.npz'}", **site_terms(cfg)}
    else:
        node |= {"partition-id": 0, "num-partitions": 2}
    return OneSite(cfg, node, "logreg", (1, 8, 8), 10)


def _rebuilt_from_the_run_config(site: OneSite, initial: dict[str, np.ndarray], reply: dict[str, Any]) -> dict:
    """What the server could compute the old way: the round's noise and sampling from ``round_seed``."""
    ins = Instruction(site._message("train", 1), site.context)
    pool = TrainingPool.build(ins.view(), None)
    model = build_model("logreg", (1, 8, 8), 10, seed=0)
    load_arrays(model, initial)
    train_private(
        model,
        pool.x,
        pool.y,
        site.cfg,
        server_round=1,
        seed=round_seed(derive_seeds(int(site.cfg["seed"]))["client"], SITE, 1),
        device=torch.device("cpu"),
        noise_multiplier=float(reply["noise-multiplier"]),
        max_grad_norm=float(site.cfg["max-grad-norm"]),
        planned_examples=int(reply["num-examples"]),
    )
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("noise", ["secret", "seeded"])
def test_the_server_rebuilds_a_sites_update_from_the_seed_only_when_noise_is_seeded(tmp_path: Path, noise: str) -> None:
    site = _site(tmp_path, noise)
    initial = copy.deepcopy(site.arrays)
    reply = site.train(1)
    assert reply["status"] == "ok"
    rebuilt = _rebuilt_from_the_run_config(site, initial, reply)
    assert not _same(site.arrays, initial), "the site trained"
    assert _same(site.arrays, rebuilt) == (noise == "seeded")


@pytest.mark.parametrize("noise", ["secret", "seeded"])
def test_a_redone_round_is_charged_again_and_secret_noise_is_fresh(tmp_path: Path, noise: str) -> None:
    site = _site(tmp_path, noise, real=noise == "secret")
    initial = copy.deepcopy(site.arrays)
    assert site.train(1)["status"] == "ok"
    first, site.arrays = site.arrays, copy.deepcopy(initial)  # the resumed server sends the same model again
    assert site.train(1)["status"] == "ok"
    ledger = json.loads((tmp_path / "state" / SITE / "privacy_ledger.json").read_text())["data"]
    assert ledger["rounds"] == 2, "the redo is a release: charged a second time"
    assert _same(first, site.arrays) == (noise == "seeded")


def test_the_secret_is_private_to_the_site_and_never_sent(tmp_path: Path) -> None:
    site = _site(tmp_path, "secret", real=True)
    msg = site._message("train", 1)
    reply = client_app.train(msg, site.context)
    path = tmp_path / "state" / SITE / SECRET_ENTRY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_bytes()
    assert len(secret) == 32
    assert site.train(2)["status"] == "ok" and path.read_bytes() == secret, "kept across rounds"
    sent = (
        b"".join(a.tobytes() for a in record_to_arrays(reply.content.array_records["arrays"]).values())
        + repr(
            {
                name: dict(r)
                for name, r in [*reply.content.metric_records.items(), *reply.content.config_records.items()]
            }
        ).encode()
    )
    assert secret not in sent and secret.hex().encode() not in sent
    names = [k for r in reply.content.metric_records.values() for k in r]
    assert not any("secret" in k for k in names)


def test_a_real_node_refuses_seeded_noise(tmp_path: Path) -> None:
    site = _site(tmp_path, "seeded", real=True)
    reply = client_app.train(site._message("train", 1), site.context)
    assert reply.content.config_records["meta"]["status"] == "error"
    reason = str(reply.content.config_records["meta"]["reason"])
    assert "'dp-noise' = 'seeded'" in reason and "real node refuses" in reason
    assert not (tmp_path / "state" / SITE / "privacy_ledger.json").exists(), "nothing trained or charged"


@pytest.mark.parametrize("noise", ["secret", "seeded"])
def test_server_dp_noise_is_fresh_entropy_unless_seeded(noise: str) -> None:
    """The server's DP-FedAvg noise: the run seed (which the sites know) fixes it only under ``seeded``."""
    reference = {"w": np.zeros((4, 4), dtype=np.float32)}
    draws = [
        StamenStrategy({"server-dp-clip": 1.0, "dp-noise": noise}).server_dp.noise(reference, 1)["w"] for _ in range(2)
    ]
    assert np.array_equal(draws[0], draws[1]) == (noise == "seeded")
    assert np.any(draws[0] != 0)

"""Operators' side of model versions: list, export with a model card, pin and promote.

The release pointer (``versions/releases.json``) says which version is released; only
these functions write it, the server only reads it (to never prune a released version's
file). Two ways to move it:

- **pin** VERSION: release exactly that version, unconditionally — the operator's
  override, e.g. to hold a release back on a known-good version;
- **promote** [VERSION]: release VERSION (default: the run's best version, by evaluation
  accuracy as the server ranks them) only if its recorded evaluation accuracy is no
  worse than the released one's; ``force`` skips that check. Rolled-back and abandoned versions are never promoted.

``export --released`` exports whatever the pointer names. Every change is appended to the
record's log with the time and the previous version.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from stamen.common.errors import StamenError, StateError
from stamen.common.state import atomic_write_bytes, atomic_write_json
from stamen.server.versions import RELEASES, VERSIONS_DIR, read_index, read_releases

CARD_SCHEMA_VERSION = 1


def _entry(index: dict[str, Any], version: int) -> dict[str, Any]:
    for e in index["versions"]:
        if e["version"] == version:
            return e
    known = [e["version"] for e in index["versions"]]
    span = f"{min(known)}..{max(known)}" if known else "none"
    raise StamenError(f"no model version {version} in this run (versions: {span})")


def list_versions(run_dir: Path) -> list[dict[str, Any]]:
    """Every version with a ``released`` flag, oldest first."""
    index = read_index(run_dir)
    released = read_releases(run_dir)["released"]
    return [{**e, "released": e["version"] == released} for e in index["versions"]]


def _accuracy(entry: dict[str, Any]) -> float:
    acc = entry.get("metrics", {}).get("accuracy")
    return float(acc) if isinstance(acc, (int, float)) and math.isfinite(acc) else -math.inf


def _set_released(run_dir: Path, version: int, action: str) -> dict[str, Any]:
    doc = read_releases(run_dir)
    previous = doc["released"]
    doc["log"].append(
        {
            "version": version,
            "action": action,
            "previous": previous,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    doc["released"] = version
    atomic_write_json(Path(run_dir) / VERSIONS_DIR / RELEASES, doc, mode=0o644)
    if not (Path(run_dir) / VERSIONS_DIR / _entry(read_index(run_dir), version)["file"]).exists():
        raise StateError(f"version {version} was recorded as released, but the server pruned its file meanwhile")
    return {"version": version, "previous": previous, "action": action}


def pin(run_dir: Path, version: int) -> dict[str, Any]:
    """Release exactly ``version``; its model file must still exist."""
    entry = _entry(read_index(run_dir), version)
    if not entry["file"]:
        raise StamenError(f"version {version}'s model file was pruned (versions-keep); it cannot be released")
    return _set_released(run_dir, version, "pin")


def promote(run_dir: Path, version: int | None = None, *, force: bool = False) -> dict[str, Any]:
    """Release ``version`` (default: the best) if it is no worse than the released version."""
    index = read_index(run_dir)
    if version is None:
        if index.get("best") is None:
            raise StamenError(f"{run_dir} has no evaluated best version yet; name the version to promote")
        version = int(index["best"])
    entry = _entry(index, version)
    if entry["status"] != "ok":
        raise StamenError(f"version {version} has status {entry['status']!r}; only ok versions are promoted")
    if not entry["file"]:
        raise StamenError(f"version {version}'s model file was pruned (versions-keep); it cannot be released")
    current = read_releases(run_dir)["released"]
    if current is not None and not force:
        now = _entry(index, current)
        if _accuracy(entry) < _accuracy(now):
            raise StamenError(
                f"version {version} (accuracy {_accuracy(entry):.4f}) is worse than the released version {current} "
                f"(accuracy {_accuracy(now):.4f}); pin it, or promote with --force"
            )
    return _set_released(run_dir, version, "promote")


def _card(run_dir: Path, index: dict[str, Any], entry: dict[str, Any], released: bool, sha: str) -> dict[str, Any]:
    record_path = Path(run_dir) / "config.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    config = record.get("config", {})
    eps = entry.get("epsilon", {})
    return {
        "schema": CARD_SCHEMA_VERSION,
        "model": index["model"],
        "version": entry["version"],
        "round": entry["round"],
        "parent": entry["parent"],
        "created": entry["created"],
        "status": entry["status"],
        "released": released,
        "metrics": entry.get("metrics", {}),
        "contributors": entry.get("contributors", []),
        "privacy": {
            "dp": bool(config.get("dp", False)),
            "delta": config.get("delta"),
            "accountant": config.get("accountant"),
            "epsilon_per_site": eps,
            "epsilon_max": max(eps.values(), default=0.0),
            "meaning": "each site's cumulative epsilon over every round it trained up to this version "
            "(sample-level DP-SGD, from its privacy ledger); the model depends on all of them",
        },
        "training": {k: config.get(k) for k in ("dataset", "strategy", "lr", "local-epochs", "seed") if k in config},
        "run": {"dir": str(Path(run_dir).resolve()), "git_commit": record.get("git_commit")},
        "file_sha256": sha,
    }


def _markdown(card: dict[str, Any]) -> str:
    metrics = "\n".join(f"| {k} | {v} |" for k, v in card["metrics"].items()) or "| (not evaluated) | |"
    eps = "\n".join(f"| {s} | {e:.4f} |" for s, e in sorted(card["privacy"]["epsilon_per_site"].items()))
    privacy = (
        f"DP-SGD on every site, delta {card['privacy']['delta']}, accountant {card['privacy']['accountant']}. "
        f"{card['privacy']['meaning']}.\n\n| site | epsilon |\n|---|---|\n{eps}"
        if card["privacy"]["dp"]
        else "Trained without differential privacy."
    )
    return (
        f"# Model card: {card['model']['name']} version {card['version']}\n\n"
        f"- round {card['round']}, computed from version {card['parent']}, created {card['created']}\n"
        f"- status: {card['status']}{', released' if card['released'] else ''}\n"
        f"- input shape {card['model']['input_shape']}, {card['model']['num_classes']} classes\n"
        f"- contributing sites this round: {', '.join(card['contributors']) or 'none'}\n"
        f"- file SHA-256: `{card['file_sha256']}`\n\n"
        f"## Evaluation\n\n| metric | value |\n|---|---|\n{metrics}\n\n## Privacy\n\n{privacy}\n"
    )


def export_version(run_dir: Path, version: int | None, out: Path) -> tuple[Path, Path, Path]:
    """Write ``version`` (None: the released one) to ``out`` plus ``.card.json`` and ``.card.md``."""
    index = read_index(run_dir)
    released = read_releases(run_dir)["released"]
    if version is None:
        if released is None:
            raise StamenError(f"{run_dir} has no released version: pin or promote one first")
        version = int(released)
    entry = _entry(index, version)
    if not entry["file"]:
        raise StamenError(f"version {version}'s model file was pruned by the keep policy (versions-keep)")
    source = Path(run_dir) / VERSIONS_DIR / entry["file"]
    try:
        arrays = st_load(source.read_bytes())
    except (OSError, SafetensorError) as exc:
        raise StateError(f"model file {source} is unreadable: {exc}") from exc
    blob = st_save(arrays, metadata={"version": str(version), "round": str(entry["round"]), **_str(index["model"])})
    out = Path(out)
    atomic_write_bytes(out, blob, mode=0o644)
    card = _card(run_dir, index, entry, version == released, hashlib.sha256(blob).hexdigest())
    stem = out.name.removesuffix(".safetensors")
    card_json, card_md = out.with_name(f"{stem}.card.json"), out.with_name(f"{stem}.card.md")
    atomic_write_json(card_json, card, mode=0o644)
    atomic_write_bytes(card_md, _markdown(card).encode(), mode=0o644)
    return out, card_json, card_md


def _str(model: dict[str, Any]) -> dict[str, str]:
    """Safetensors metadata is string to string."""
    return {
        "model": str(model["name"]),
        "input_shape": json.dumps(model["input_shape"]),
        "num_classes": str(model["num_classes"]),
    }

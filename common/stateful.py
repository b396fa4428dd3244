"""The one interface every piece of checkpointed state implements.

The shape of ``torch.nn.Module.state_dict`` / Opacus' accountant ``state_dict``: a part
hands out its whole state as a dict and takes it back with ``load_state_dict``. The run's
checkpoint (:mod:`server.run_state`) only ever talks to parts through this protocol, so a
part that implements it is saved and restored without the checkpoint code knowing it.

A state dict holds JSON values, and numpy arrays only as *array groups*: a top-level value
that is a ``dict[str, np.ndarray]`` (a model, an optimizer buffer), which the checkpoint
stores in safetensors rather than JSON.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    """Something whose state a checkpoint saves and a resumed run restores."""

    def state_dict(self) -> dict[str, Any]:
        """The whole state, as plain values and array groups (a copy, not a view)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state :meth:`state_dict` returned (in this or an earlier process)."""
        ...

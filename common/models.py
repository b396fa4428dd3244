"""The model registry: small models that fit the data's shape, all Opacus-compatible.

Opacus-compatible means: no BatchNorm (GroupNorm where normalisation is needed) and no
in-place activations, so DP-SGD's per-sample gradients work on every registered model.
A user model is ``package.module:Class``, constructed as ``Class(input_shape,
num_classes)``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F

from stamen.common.errors import ConfigError

Builder = Callable[[tuple[int, ...], int], nn.Module]


class LogReg(nn.Module):
    """Multinomial logistic regression on flattened inputs."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """One hidden layer of 128 units: a sensible default for tabular data."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN28(nn.Module):
    """Two conv + two dense layers for 28x28 images (MNIST-sized)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN8(nn.Module):
    """Two padded conv + two dense layers for 8x8 images (scikit-learn digits)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN28Tanh(nn.Module):
    """A small tanh CNN for 28x28 images, shaped for DP-SGD (about 26k parameters).

    DP-SGD's noise grows with the parameter count and clipping favours bounded
    activations: Papernot et al. (2021, "Tempered sigmoid activations for deep learning
    with differential privacy") report tanh nets of this shape well ahead of ReLU ones
    on MNIST at the same epsilon.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 8, stride=2, padding=3),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).numel()
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 32), nn.Tanh(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ScatNet28(nn.Module):
    """Fixed wavelet scattering features, GroupNorm and a linear classifier (about 40k parameters).

    Tramèr & Boneh (2021, "Differentially private learning needs better features (or much
    more data)") show that a scattering transform (Mallat's wavelets, fixed, not learned:
    no privacy cost) followed by a normalised linear model beats end-to-end CNNs under
    DP-SGD on MNIST by a wide margin at the same epsilon. The transform is kymatio's
    (J=2 scales, 8 angles: 81 channels per input channel at a quarter of the resolution);
    its filters are non-persistent buffers, so they are neither sent nor averaged.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        # The 2-D frontend directly: kymatio.torch also imports its 3-D frontend, which needs
        # scipy.special.sph_harm (gone from SciPy 1.17).
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        channels, height, width = input_shape
        if height % 4 or width % 4:
            raise ConfigError(f"model scatnet28 needs image sides divisible by 4, data has shape {input_shape}")
        self.scattering = ScatteringTorch2D(J=2, shape=(height, width), L=8)
        for name, buffer in list(self.scattering.named_buffers(recurse=False)):
            self.scattering.register_buffer(name, buffer, persistent=False)
        features = 81 * channels
        self.norm = nn.GroupNorm(27 * channels, features)
        self.classifier = nn.Linear(features * (height // 4) * (width // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # a fixed transform of the input: nothing to train in it
            features = self.scattering(x).flatten(1, 2)
        return self.classifier(self.norm(features).flatten(1))


REGISTRY: dict[str, Builder] = {
    "logreg": LogReg,
    "mlp": MLP,
    "cnn28": CNN28,
    "cnn28-tanh": CNN28Tanh,
    "cnn8": CNN8,
    "scatnet28": ScatNet28,
}


def resolve_model_name(name: str, input_shape: tuple[int, ...]) -> str:
    """Pick a registry model for ``auto`` from the input shape; pass others through."""
    if name != "auto":
        return name
    if len(input_shape) == 3 and input_shape[1:] == (28, 28):
        return "cnn28"
    if len(input_shape) == 3 and input_shape[1:] == (8, 8):
        return "cnn8"
    return "mlp"


def _user_builder(spec: str) -> Builder:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ConfigError(f"model {spec!r}: {module_name} has no callable {attr!r}")
    return builder


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int | None = None,
    dp: bool = False,
    fix: bool = False,
) -> nn.Module:
    """Construct a model; with ``seed`` its initial weights are reproducible.

    With ``dp`` the model must pass Opacus's validator (``fix``: fixed by it, e.g.
    BatchNorm -> GroupNorm). Server and sites build through here with the same flags, so
    a fixed model has the same parameters everywhere.
    """
    resolved = resolve_model_name(name, input_shape)
    if ":" in resolved:
        builder = _user_builder(resolved)
    elif resolved in REGISTRY:
        builder = REGISTRY[resolved]
    else:
        valid = ", ".join(["auto", *REGISTRY, "package.module:Class"])
        raise ConfigError(f"unknown model {name!r}; choose one of {valid}")
    if resolved in ("cnn28", "cnn28-tanh", "cnn8", "scatnet28") and len(input_shape) != 3:
        raise ConfigError(f"model {resolved} needs image input (C,H,W), data has shape {input_shape}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = builder(tuple(input_shape), num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r} did not build a torch.nn.Module")
    return check_private_model(model, fix=fix) if dp else model


def check_private_model(model: nn.Module, *, fix: bool = False) -> nn.Module:
    """``model`` if Opacus can train it (``fix``: a fixed copy, e.g. BatchNorm -> GroupNorm).

    A fixed model has other parameters, so fix where the model is built (:func:`build_model`),
    on every site and the server alike, not per round.
    """
    if fix:
        model = ModuleValidator.fix(model)
    was_training = model.training
    try:
        _validate(model.train())
    finally:
        model.train(was_training)
    return model


def _validate(model: nn.Module) -> None:
    """Opacus's checks of a model in training mode, as one ConfigError listing every problem."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        listed = "; ".join(str(e) for e in errors)
        raise ConfigError(f"model {type(model).__name__} cannot be trained with DP-SGD (Opacus): {listed}")


@torch.no_grad()
def evaluate_model(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y)."""
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        logits = model(xb).float()
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    n = max(len(y), 1)
    return loss_sum / n, correct / n

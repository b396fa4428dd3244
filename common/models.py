"""The model registry: small models that fit the data's shape, all Opacus-compatible.

Opacus-compatible means: no BatchNorm (GroupNorm where normalisation is needed) and no
in-place activations, so DP-SGD's per-sample gradients work on every registered model.
A user model is ``package.module:Class``, constructed as ``Class(input_shape,
num_classes)``.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable

import torch
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F

from stamen.common.errors import ConfigError, StamenError

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
        self.feature_key = f"kymatio-scattering2d/J=2/L=8/{channels}x{height}x{width}"

    @torch.no_grad()  # a fixed transform of each input: nothing to train in it
    def fixed_features(self, x: torch.Tensor) -> torch.Tensor:
        """The scattering coefficients, (N, 81 * C, H / 4, W / 4): what :mod:`common.features` caches."""
        if len(x) == 0:  # an empty Poisson batch under DP-SGD: MKL's FFT refuses a batch of none
            channels, height, width = x.shape[1:]
            return x.new_zeros(0, 81 * channels, height // 4, width // 4)
        return self.scattering(x).flatten(1, 2)

    def trainable_head(self) -> nn.Module:
        """GroupNorm and the linear layer over :meth:`fixed_features`, sharing this model's parameters."""
        return _NormLinearHead(self.norm, self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm_linear(self.norm, self.classifier, self.fixed_features(x))


class _NormLinearHead(nn.Module):
    """ScatNet28's trainable part on its own, for training and evaluating on cached features.

    Built on demand (never a registered child of the model), so the model's ``state_dict``
    keys stay ``norm.*`` and ``classifier.*``.
    """

    def __init__(self, norm: nn.GroupNorm, classifier: nn.Linear) -> None:
        super().__init__()
        self.norm = norm
        self.classifier = classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return _norm_linear(self.norm, self.classifier, features)


def _norm_linear(norm: nn.Module, classifier: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """ScatNet28's head, one definition for the full forward and the cached-feature head."""
    return classifier(norm(features).flatten(1))


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


#: The node-config key of a site's allow-list of ``package.module:Class`` models (comma-separated).
SITE_MODELS = "site-models"


class ModelNotAllowed(StamenError):
    """The instruction names a model class this site's configuration does not allow: nothing is imported."""

    code = "model-not-allowed"


def check_site_model(name: str, allowed: object) -> None:
    """Refuse a ``package.module:Class`` model unless listed in the site's ``site-models``.

    Importing a module runs its code, so a site runs only code it chose: registry models
    (installed with stamen) always, a user class only when the site's own config names it.
    """
    if ":" not in name:
        return
    if name not in {n.strip() for n in str(allowed or "").split(",")}:
        raise ModelNotAllowed(
            f"model {name!r} is not in this site's {SITE_MODELS} allow-list; a site imports only model classes "
            f"its own node config names (--set {SITE_MODELS}={name})"
        )


def import_user(spec: str, what: str) -> Callable[..., object]:
    """The callable ``package.module:name`` names, imported with the working directory on the path.

    ``simulate``, ``lr-find`` and ``node`` all resolve a user's code here, so a module beside
    the user imports the same way in each (a console script does not put the working
    directory on ``sys.path`` by itself).
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {spec!r} must look like package.module:name")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a user's module may fail with anything while it runs
        raise ConfigError(
            f"{what} {spec!r}: cannot import module {module_name!r} from {cwd} or the Python path "
            f"({type(exc).__name__}: {one_line(exc)})"
        ) from exc
    found = getattr(module, attr, None)
    if not callable(found):
        raise ConfigError(f"{what} {spec!r}: {module_name} has no callable {attr!r}")
    return found


def one_line(exc: BaseException) -> str:
    """An exception's text on one line (the CLI's errors are one line each)."""
    return " ".join(str(exc).split()) or type(exc).__name__


#: How stamen calls a user model class, said in every error about one.
MODEL_SIGNATURE = "Class(input_shape: tuple[int, ...], num_classes: int)"


def _build_user(spec: str, builder: Callable[..., object], input_shape: tuple[int, ...], num_classes: int) -> object:
    """``builder(input_shape, num_classes)``; a class of another signature fails saying which one is expected."""
    try:
        inspect.signature(builder).bind(input_shape, num_classes)
    except TypeError as exc:
        raise ConfigError(
            f"model {spec!r} cannot be called with (input_shape, num_classes) ({one_line(exc)}); "
            f"the expected signature is {MODEL_SIGNATURE}: give it that, or wrap it in a class that has it"
        ) from None
    except ValueError:  # no introspectable signature (a builtin): the call below tells
        pass
    try:
        return builder(input_shape, num_classes)
    except Exception as exc:  # a user's constructor may fail with anything
        raise ConfigError(
            f"model {spec!r} failed to build with input_shape={input_shape}, num_classes={num_classes} "
            f"({type(exc).__name__}: {one_line(exc)}); the expected signature is {MODEL_SIGNATURE}"
        ) from exc


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
    user = ":" in resolved
    if user:
        builder = import_user(resolved, "model")
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
        shape = tuple(input_shape)
        model = _build_user(resolved, builder, shape, num_classes) if user else builder(shape, num_classes)
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
        _validate(model.train(), fixed=fix)
    finally:
        model.train(was_training)
    return model


def _validate(model: nn.Module, *, fixed: bool) -> None:
    """Opacus's checks of a model in training mode, as one ConfigError listing every problem.

    When Opacus's own fix (``dp-fix-model``) would make the model trainable, the error says so.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        listed = "; ".join(one_line(e).split(". ")[0] for e in errors)  # Opacus explains at length
        hint = ""
        if not fixed and not ModuleValidator.validate(ModuleValidator.fix(copy.deepcopy(model)), strict=False):
            hint = "; Opacus can fix it: --set dp-fix-model=true (server and sites then train the fixed model)"
        raise ConfigError(f"model {type(model).__name__} cannot be trained with DP-SGD (Opacus): {listed}{hint}")


def preflight_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, x: torch.Tensor, y: torch.Tensor, *, dp: bool, fix: bool
) -> None:
    """Build the run's model as the server and sites will, and run one forward and backward on (x, y).

    A model that cannot be imported, built, trained on this data or (with ``dp``) trained by
    Opacus fails here in one line, before any engine starts.
    """
    with torch.random.fork_rng(devices=[]):
        model = build_model(name, input_shape, num_classes, seed=0, dp=dp, fix=fix).train()
        x = x.reshape(-1, *input_shape)
        try:
            logits = model(x)
        except Exception as exc:  # a user's forward may fail with anything
            raise ConfigError(
                f"model {name!r} failed on a batch of shape {tuple(x.shape)} ({type(exc).__name__}: {one_line(exc)})"
            ) from exc
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(x), num_classes):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ConfigError(
                f"model {name!r} must return logits of shape (batch, num_classes) = {(len(x), num_classes)}, got {got}"
            )
        try:
            F.cross_entropy(logits.float(), y).backward()
        except Exception as exc:  # an in-place op or a detached output shows here
            raise ConfigError(f"model {name!r}: backward pass failed ({type(exc).__name__}: {one_line(exc)})") from exc


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

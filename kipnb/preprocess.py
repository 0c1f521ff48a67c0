"""Preprocessing as fitted, invertible transforms: standardization, ZCA, per-image layer norm.

Each transform is a frozen dataclass: ``t = ZCA(reg=0.1).fit(train_images)`` returns a
fitted copy; ``t.apply(x)`` maps images (N, H, W, C) to the model's input space and
``t.invert(z)`` maps back (for display). ``t.recipe()`` is a JSON-able description,
``from_recipe(recipe)`` rebuilds the unfitted transform, so a :class:`DistilledSet`
records how its images were preprocessed and the transform can be refitted exactly
(fitting is deterministic) on the same training split.

Fit on the training split, apply the same fitted transform to the test split.

- :class:`Standardize`: per-channel mean and standard deviation.
- :class:`LayerNorm`: per image, subtract its mean and scale it to unit mean square
  (as KIP does before ZCA). Per-image statistics are lost, so ``invert`` restores the
  average per-image mean and scale seen in fitting: exact for such an image, and the
  natural choice for synthetic images, which have no statistics of their own.
- :class:`ZCA`: whitening ``W = U diag((s + eps)^-1/2) U^T`` from the eigendecomposition
  ``U diag(s) U^T`` of the feature covariance. ``eps = reg * trace(cov) / d`` when
  ``relative=True`` (KIP's convention, reg = 0.1 there), ``eps = reg`` otherwise (kornia's
  ``ZCAWhitening(eps=0.1)`` as MTT and DATM use it). The inverse is
  ``U diag((s + eps)^1/2) U^T``, exact for any ``eps > 0``.
- :class:`Pipeline`: transforms in sequence; ``make(method)`` builds the common ones.

The two ZCA conventions have distinct method names in :func:`make` (and everywhere a
preprocessing is named: :func:`kipnb.data.prepare`, ``KIPConfig``, ``ExpertConfig``):

=================  ==========================================================  =============
method             what                                                        used by
=================  ==========================================================  =============
``'zca'``          ZCA of the pixels, ``eps = zca_reg * trace(cov) / d``       KIP (relative)
``'zca_kornia'``   ZCA of the [0, 1] pixels, ``eps = zca_reg`` (kornia's       MTT, DATM
                   ``ZCAWhitening(eps=0.1)``)
``layernorm_zca``  per-image layer norm, then relative ZCA                     KIP (CIFAR)
=================  ==========================================================  =============

:func:`method_name` names a fitted transform by these names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "METHODS",
    "ZCA",
    "LayerNorm",
    "Pipeline",
    "Standardize",
    "equal",
    "from_recipe",
    "from_state",
    "make",
    "method_name",
    "state",
]


def _check_images(x: np.ndarray, what: str = "images") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(
            f"{what} must be a batch of images (N, H, W, C); got shape {x.shape}. "
            f"Add a batch axis (x[None]) or a channel axis (x[..., None])."
        )
    return x


class _Fitted:
    """Shared behaviour: fitted-ness checks and shape checks."""

    _fitted_fields: tuple[str, ...] = ()

    @property
    def fitted(self) -> bool:
        return all(getattr(self, f) is not None for f in self._fitted_fields)

    def _require_fit(self):
        if not self.fitted:
            raise ValueError(
                f"{type(self).__name__} is not fitted: call .fit(train_images) first "
                f"and use the transform it returns."
            )


@dataclass(frozen=True, eq=False)
class Standardize(_Fitted):
    """Per-channel standardization: (x - mean_c) / std_c."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    _fitted_fields = ("mean", "std")

    def fit(self, x) -> Standardize:
        x = _check_images(x).astype(np.float64)
        std = x.std(axis=(0, 1, 2))
        return dataclasses.replace(self, mean=x.mean(axis=(0, 1, 2)), std=np.maximum(std, 1e-12))

    def apply(self, x) -> np.ndarray:
        self._require_fit()
        x = _check_images(x)
        if x.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"fitted on {self.mean.shape[0]} channels, got {x.shape[-1]}")
        return ((x - self.mean) / self.std).astype(np.float32)

    def invert(self, z) -> np.ndarray:
        self._require_fit()
        return (np.asarray(z) * self.std + self.mean).astype(np.float32)

    def recipe(self) -> dict:
        return {"kind": "standardize"}


@dataclass(frozen=True, eq=False)
class LayerNorm(_Fitted):
    """Per image: subtract its mean over all pixels and channels, scale to unit mean square."""

    mean: float | None = None  # average per-image mean seen in fit (for invert)
    scale: float | None = None  # average per-image RMS after centering (for invert)
    eps: float = 1e-12
    _fitted_fields = ("mean", "scale")

    @staticmethod
    def _stats(x):
        m = x.mean(axis=(1, 2, 3), keepdims=True)
        s = np.sqrt(((x - m) ** 2).mean(axis=(1, 2, 3), keepdims=True))
        return m, s

    def fit(self, x) -> LayerNorm:
        x = _check_images(x).astype(np.float64)
        m, s = self._stats(x)
        return dataclasses.replace(self, mean=float(m.mean()), scale=float(s.mean()))

    def apply(self, x) -> np.ndarray:
        self._require_fit()
        x = _check_images(x).astype(np.float64)
        m, s = self._stats(x)
        return ((x - m) / np.maximum(s, self.eps)).astype(np.float32)

    def invert(self, z) -> np.ndarray:
        self._require_fit()
        return (np.asarray(z) * self.scale + self.mean).astype(np.float32)

    def recipe(self) -> dict:
        return {"kind": "layernorm"}


@dataclass(frozen=True, eq=False)
class ZCA(_Fitted):
    """ZCA whitening of the flattened images with a regularization strength ``reg``."""

    reg: float = 0.1
    relative: bool = True
    mean: np.ndarray | None = None  # (D,)
    eigenvalues: np.ndarray | None = None  # (D,) of the covariance, descending
    eigenvectors: np.ndarray | None = None  # (D, D), columns
    eps: float | None = None  # the absolute regularizer actually added
    _fitted_fields = ("mean", "eigenvalues", "eigenvectors")

    def __post_init__(self):
        if not self.reg > 0:
            raise ValueError(
                f"ZCA reg must be > 0 (got {self.reg}): the covariance of image data is "
                f"often singular. Use a small positive value such as 1e-4."
            )

    def fit(self, x) -> ZCA:
        x = _check_images(x)
        flat = x.reshape(x.shape[0], -1).astype(np.float64)
        mean = flat.mean(axis=0)
        flat = flat - mean
        cov = flat.T @ flat / flat.shape[0]
        s, u = np.linalg.eigh(cov)
        s, u = np.clip(s[::-1], 0.0, None), u[:, ::-1]
        eps = self.reg * float(np.trace(cov)) / cov.shape[0] if self.relative else self.reg
        return dataclasses.replace(self, mean=mean, eigenvalues=s, eigenvectors=u, eps=eps)

    def _matrix(self, power: float) -> np.ndarray:
        u = self.eigenvectors
        return (u * (self.eigenvalues + self.eps) ** power) @ u.T

    @property
    def whitening_matrix(self) -> np.ndarray:
        self._require_fit()
        return self._matrix(-0.5)

    def apply(self, x) -> np.ndarray:
        self._require_fit()
        x = _check_images(x)
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"ZCA was fitted on images of {self.mean.shape[0]} values, got {x.shape[1:]}"
            )
        z = (flat - self.mean) @ self._matrix(-0.5)
        return z.reshape(x.shape).astype(np.float32)

    def invert(self, z) -> np.ndarray:
        self._require_fit()
        z = _check_images(z)
        flat = z.reshape(z.shape[0], -1)
        x = flat @ self._matrix(0.5) + self.mean
        return x.reshape(z.shape).astype(np.float32)

    def recipe(self) -> dict:
        return {"kind": "zca", "reg": self.reg, "relative": self.relative}


@dataclass(frozen=True, eq=False)
class Pipeline:
    """Transforms applied in order (and inverted in reverse order)."""

    steps: tuple[Any, ...] = ()

    @property
    def fitted(self) -> bool:
        return all(s.fitted for s in self.steps)

    def fit(self, x) -> Pipeline:
        fitted = []
        for s in self.steps:
            s = s.fit(x)
            x = s.apply(x)
            fitted.append(s)
        return Pipeline(tuple(fitted))

    def fit_apply(self, x) -> tuple[Pipeline, np.ndarray]:
        t = self.fit(x)
        return t, t.apply(x)

    def apply(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        for s in self.steps:
            x = s.apply(x)
        return x

    def invert(self, z) -> np.ndarray:
        for s in reversed(self.steps):
            z = s.invert(z)
        return np.asarray(z, dtype=np.float32)

    def recipe(self) -> dict:
        return {"kind": "pipeline", "steps": [s.recipe() for s in self.steps]}


_KINDS = {"standardize": Standardize, "layernorm": LayerNorm, "zca": ZCA}

METHODS = ("none", "standardize", "zca", "zca_kornia", "layernorm_zca", "standardize_zca")


def make(method: str = "standardize", zca_reg: float = 0.1, relative: bool = True) -> Pipeline:
    """An unfitted pipeline by name: one of :data:`METHODS`.

    ``'zca'`` whitens with KIP's relative regularizer (``relative=False`` makes it
    absolute); ``'zca_kornia'`` is MTT's and DATM's ZCA: the raw [0, 1] pixels
    whitened with the absolute ``eps = zca_reg`` (no standardization first: their
    ``get_dataset`` uses ``ToTensor()`` alone when ``--zca`` is set; ``relative`` is
    ignored). ``'layernorm_zca'`` is KIP's CIFAR preprocessing; ``'none'`` is the
    identity.

    Example:
        >>> make("zca_kornia", zca_reg=0.1).steps[0].relative
        False
    """
    steps: dict[str, Sequence] = {
        "none": (),
        "standardize": (Standardize(),),
        "zca": (ZCA(zca_reg, relative),),
        "zca_kornia": (ZCA(zca_reg, relative=False),),
        "layernorm_zca": (LayerNorm(), ZCA(zca_reg, relative)),
        "standardize_zca": (Standardize(), ZCA(zca_reg, relative)),
    }
    if method not in steps:
        raise ValueError(f"Unknown preprocessing {method!r}. Known: {', '.join(METHODS)}.")
    return Pipeline(tuple(steps[method]))


def method_name(transform) -> str:
    """The :func:`make` name of a transform (fitted or not), e.g. ``'zca_kornia'``.

    ``None`` and the empty pipeline are ``'none'``. A ZCA is ``'zca'`` (relative
    regularizer) or ``'zca_kornia'`` (absolute), with its ``zca_reg`` appended when it
    is not 0.1 (``'zca(reg=0.01)'``); a chain :func:`make` does not build is named by
    its steps joined with ``'+'``.

    Example:
        >>> method_name(make("zca_kornia")), method_name(make("layernorm_zca", zca_reg=0.01))
        ('zca_kornia', 'layernorm_zca(reg=0.01)')
    """
    if transform is None:
        return "none"
    steps = transform.steps if isinstance(transform, Pipeline) else (transform,)
    names, regs = [], []
    for s in steps:
        if isinstance(s, ZCA):
            names.append("zca" if s.relative else "zca_kornia")
            regs.append(s.reg)
        else:
            names.append(s.recipe()["kind"])
    joined = "_".join(names) if names else "none"
    if joined not in METHODS:
        joined = "+".join(names)
    if regs and regs[0] != 0.1:
        joined += f"(reg={regs[0]:g})"
    return joined


def from_recipe(recipe: dict) -> Any:
    """Rebuild an unfitted transform from ``t.recipe()``."""
    kind = recipe.get("kind")
    if kind == "pipeline":
        return Pipeline(tuple(from_recipe(r) for r in recipe["steps"]))
    if kind not in _KINDS:
        raise ValueError(f"Unknown transform kind {kind!r} in recipe {recipe}.")
    return _KINDS[kind](**{k: v for k, v in recipe.items() if k != "kind"})


def state(transform) -> tuple[dict, dict[str, np.ndarray]]:
    """A fitted transform as ``(recipe, arrays)``: JSON-able recipe and its fitted arrays.

    ``from_state(recipe, arrays)`` rebuilds the identical fitted transform (bit for bit),
    so a :class:`kipnb.DistilledSet` can carry the preprocessing its images are in.

    Example:
        >>> import numpy as np
        >>> t = make("standardize").fit(np.arange(8.0).reshape(2, 2, 2, 1))
        >>> recipe, arrays = state(t)
        >>> u = from_state(recipe, arrays)
        >>> bool(np.array_equal(u.apply(np.ones((1, 2, 2, 1))), t.apply(np.ones((1, 2, 2, 1)))))
        True
    """
    if isinstance(transform, Pipeline):
        recipe = {"kind": "pipeline", "steps": []}
        arrays: dict[str, np.ndarray] = {}
        for i, s in enumerate(transform.steps):
            r, a = state(s)
            recipe["steps"].append(r)
            arrays.update({f"{i}.{k}": v for k, v in a.items()})
        return recipe, arrays
    if type(transform) not in _KINDS.values():
        raise TypeError(f"Not a kipnb.preprocess transform: {type(transform).__name__}.")
    transform._require_fit()
    recipe = transform.recipe()
    arrays = {}
    for f in dataclasses.fields(transform):
        v = getattr(transform, f.name)
        if f.name in recipe or f.name == "kind":
            continue
        arrays[f.name] = np.asarray(v)
    return recipe, arrays


def from_state(recipe: dict, arrays: dict) -> Any:
    """Rebuild the fitted transform that :func:`state` described (see there)."""
    kind = recipe.get("kind") if isinstance(recipe, dict) else None
    if kind == "pipeline":
        steps = []
        for i, r in enumerate(recipe.get("steps", [])):
            prefix = f"{i}."
            sub = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            steps.append(from_state(r, sub))
        return Pipeline(tuple(steps))
    t = from_recipe(recipe)
    values = {}
    for f in dataclasses.fields(t):
        if f.name in recipe:
            continue
        if f.name not in arrays:
            raise ValueError(
                f"The fitted {kind!r} transform lacks its array {f.name!r} (recipe {recipe})."
            )
        a = np.asarray(arrays[f.name])
        values[f.name] = a.item() if a.ndim == 0 else a
    return dataclasses.replace(t, **values)


def equal(a, b) -> bool:
    """Whether two fitted transforms (or None, the identity) map images identically."""
    if a is None or b is None:
        return (a is None or _is_identity(a)) and (b is None or _is_identity(b))
    (ra, xa), (rb, xb) = state(a), state(b)
    if _normal(ra) != _normal(rb) or set(xa) != set(xb):
        return False
    return all(np.array_equal(np.asarray(xa[k]), np.asarray(xb[k])) for k in xa)


def _is_identity(t) -> bool:
    return isinstance(t, Pipeline) and not t.steps


def _normal(recipe: dict) -> dict:
    # A one-step pipeline and the step itself are the same transform.
    if recipe.get("kind") == "pipeline" and len(recipe["steps"]) == 1:
        return _normal(recipe["steps"][0])
    return recipe

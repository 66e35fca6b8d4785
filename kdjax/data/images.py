"""Class-conditional data for the diffusion experiments, as grain random-access sources.

Every source yields examples {"x": float32[...], "label": int32, "example_id": int64} (images H x W x C in
[-1, 1]), so `kdjax.data.pipeline.train_dataset` / `train_iterator` batch, shuffle, split per process and
checkpoint them exactly as they do token sequences.

  * `Mixture2D`: a 2-D class-conditional Gaussian mixture with OVERLAPPING classes and an exact sampler,
    so held-out ground truth of any size is one call away; `nearest_class` is its guidance metric.
  * `digits_split`: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), scaled to [-1, 1],
    with a fixed stratified train/test split (nothing is downloaded: the data ship inside the wheel).
  * `tfds_images`: any TFDS image dataset prepared locally (e.g. `tfds build cifar10
    --file_format=array_record`), read with `tfds.data_source(..., download=False)` (no TensorFlow).
  * `load_from_config(config.data)`: one of the above by `name` ("mixture2d", "digits", "tfds:<name>").
"""

from __future__ import annotations

import dataclasses
import operator
import os
from collections.abc import Sequence
from typing import Optional

import numpy as np

DIGITS_TEST_SIZE = 360


class ArraySource:
    """Random access over in-memory arrays x [n, ...] and labels [n]: a grain data source."""

    def __init__(self, x: np.ndarray, labels: np.ndarray):
        x, labels = np.asarray(x, np.float32), np.asarray(labels, np.int32)
        if x.shape[0] != labels.shape[0] or labels.ndim != 1:
            raise ValueError(f"x {x.shape} and labels {labels.shape} do not pair up")
        if x.shape[0] < 1:
            raise ValueError("empty source")
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index) -> dict:
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {index} out of range [0, {len(self)})")
        return {"x": self.x[i], "label": self.labels[i], "example_id": np.int64(i)}

    def __repr__(self) -> str:
        return f"ArraySource(n={len(self)}, shape={self.x.shape[1:]})"


class ChunkedSource:
    """Element j = `chunk` examples of `source` stacked: {"x": [chunk, ...], "label": [chunk], "example_id": [chunk]}.

    Why: grain spends ~0.1-0.2 ms per element on shuffling and batching, more than a whole train step of a
    0.1M-parameter denoiser on a batch of 256; reading chunks cuts that by `chunk`.  The chunks are a fixed
    seeded partition of a permutation of the examples (the last one wraps around to the first examples, so
    nothing is dropped); `train_dataset` reshuffles the chunks every epoch.  Batches come out as
    [B / chunk, chunk, ...]: flatten the first two axes (`flatten_chunks`).
    """

    def __init__(self, source, chunk: int, *, seed: int):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        n = len(source)
        perm = np.random.default_rng(seed).permutation(n)
        self.index = np.resize(perm, -(-n // chunk) * chunk).reshape(-1, chunk)
        self.source, self.chunk = source, chunk

    def __len__(self) -> int:
        return self.index.shape[0]

    def __getitem__(self, index) -> dict:
        i = operator.index(index)
        rows = self.index[i]
        if isinstance(self.source, ArraySource):
            return {"x": self.source.x[rows], "label": self.source.labels[rows], "example_id": rows.astype(np.int64)}
        items = [self.source[int(r)] for r in rows]
        return {k: np.stack([it[k] for it in items]) for k in ("x", "label", "example_id")}


def flatten_chunks(batch: dict) -> dict:
    """[c, chunk, ...] -> [c * chunk, ...] for every array of a batch of ChunkedSource elements."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------
# 2-D mixture
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mixture2D:
    """p(x | c) = mean over the class's components k of N(x; means[k], std^2 I).

    Components sit on a ring, assigned to classes round-robin, so each class's components have
    neighbours of OTHER classes close enough (std vs spacing) that the classes overlap: a sample nearest
    its own class's component is likely, not certain, and guidance should make it more likely.
    """

    means: np.ndarray  # [M, 2]
    component_class: np.ndarray  # [M] int
    std: float

    @property
    def num_classes(self) -> int:
        return int(self.component_class.max()) + 1

    def sample(self, rng: np.random.Generator, labels) -> np.ndarray:
        """Exact samples x [n, 2] float32 for the given class labels [n]."""
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        comps = np.empty(labels.shape, np.int64)
        for c in range(self.num_classes):
            own = np.flatnonzero(self.component_class == c)
            rows = labels == c
            comps[rows] = rng.choice(own, size=int(rows.sum()))
        x = self.means[comps] + self.std * rng.standard_normal((labels.size, 2))
        return x.astype(np.float32)

    def nearest_class(self, x) -> np.ndarray:
        """The class of the component mean nearest to each point: [n, 2] -> [n] int."""
        d2 = ((np.asarray(x, np.float64)[:, None, :] - self.means[None]) ** 2).sum(-1)
        return self.component_class[np.argmin(d2, axis=1)]

    def source(self, *, size: int, seed: int) -> ArraySource:
        """`size` labelled samples, classes balanced round-robin, drawn from `seed` (a held-out set
        is the same call with another seed)."""
        rng = np.random.default_rng(seed)
        labels = rng.permutation(np.arange(size) % self.num_classes)
        return ArraySource(self.sample(rng, labels), labels)


def ring_mixture(*, num_classes: int = 4, components_per_class: int = 2, radius: float = 1.0, std: float = 0.3):
    """The default mixture: num_classes * components_per_class components evenly on a ring of `radius`."""
    m = num_classes * components_per_class
    angle = 2 * np.pi * np.arange(m) / m
    means = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return Mixture2D(means=means, component_class=np.arange(m) % num_classes, std=float(std))


# ----------------------------------------------------------------------------------------------------
# scikit-learn digits
# ----------------------------------------------------------------------------------------------------


def digits_split(split: str, *, test_size: int = DIGITS_TEST_SIZE, seed: int = 0) -> ArraySource:
    """8x8 digits as x float32[8, 8, 1] in [-1, 1] (pixel / 8 - 1), labels 0..9.

    The split is stratified (each class in proportion) and fixed by `seed` (scikit-learn's
    `train_test_split`, version pinned in setup.py); "train" is the rest, in the original order.
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits split {split!r}; expected 'train' or 'test'")
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    x = digits.images.astype(np.float32)[..., None] / 8.0 - 1.0
    y = digits.target.astype(np.int32)
    _, test = train_test_split(np.arange(len(y)), test_size=test_size, stratify=y, random_state=seed)
    mask = np.zeros(len(y), bool)
    mask[test] = True
    rows = mask if split == "test" else ~mask
    return ArraySource(x[rows], y[rows])


# ----------------------------------------------------------------------------------------------------
# TFDS images
# ----------------------------------------------------------------------------------------------------


class TfdsImages(Sequence):
    """Lazy random access over a TFDS image data source: uint8 images -> float32 in [-1, 1]."""

    def __init__(self, data_source, *, image_key: str = "image", label_key: str = "label"):
        self._source, self._image_key, self._label_key = data_source, image_key, label_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index) -> dict:
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {index} out of range [0, {len(self)})")
        record = self._source[i]
        image = np.asarray(record[self._image_key])
        if image.dtype != np.uint8:
            raise TypeError(f"field {self._image_key!r} is {image.dtype}, expected uint8 pixels")
        if image.ndim == 2:
            image = image[..., None]
        return {
            "x": image.astype(np.float32) / 127.5 - 1.0,
            "label": np.int32(record[self._label_key]),
            "example_id": np.int64(i),
        }


def tfds_images(
    name: str,
    *,
    split: str,
    data_dir: Optional[str | os.PathLike] = None,
    image_key: str = "image",
    label_key: str = "label",
) -> tuple[TfdsImages, int]:
    """(source, num_classes) for a locally prepared TFDS image dataset; never downloads.

    `num_classes` comes from the dataset's ClassLabel feature `label_key`.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    data_dir = None if data_dir in (None, "") else os.fspath(data_dir)
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    feature = tfds.builder(name, data_dir=data_dir).info.features[label_key]
    num_classes = getattr(feature, "num_classes", None)
    if not num_classes:
        raise ValueError(f"TFDS {name}: feature {label_key!r} is not a ClassLabel; cannot tell num_classes")
    return TfdsImages(source, image_key=image_key, label_key=label_key), int(num_classes)


# ----------------------------------------------------------------------------------------------------
# From a config
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageData:
    """train / test sources, their example shape and classes; `mixture` is set for the 2-D data."""

    train: Sequence
    test: Sequence
    num_classes: int
    data_shape: tuple
    description: str
    mixture: Optional[Mixture2D] = None


def load_from_config(data_config) -> ImageData:
    """ImageData for `config.data.name` in "mixture2d", "digits", "tfds:<name>" (keys as in
    configs/diffusion_teacher.py: train_size / test_size / seed for the mixture, tfds_* for TFDS)."""
    name = data_config.name
    if name == "mixture2d":
        mix = ring_mixture(
            num_classes=data_config.num_classes,
            components_per_class=data_config.components_per_class,
            std=data_config.mixture_std,
        )
        train = mix.source(size=data_config.train_size, seed=data_config.seed)
        test = mix.source(size=data_config.test_size, seed=data_config.seed + 1)
        desc = (
            f"2-D ring mixture: {mix.num_classes} classes x {data_config.components_per_class} components, "
            f"std {mix.std}; train {len(train):,}, held-out {len(test):,}"
        )
        return ImageData(train, test, mix.num_classes, (2,), desc, mix)
    if name == "digits":
        train, test = digits_split("train"), digits_split("test")
        desc = f"sklearn 8x8 digits in [-1, 1]: train {len(train):,}, test {len(test):,}"
        return ImageData(train, test, 10, (8, 8, 1), desc)
    if name.startswith("tfds:"):
        ds = name[len("tfds:") :]
        kw = dict(
            data_dir=data_config.tfds_data_dir or None,
            image_key=data_config.tfds_image_key,
            label_key=data_config.tfds_label_key,
        )
        train, num_classes = tfds_images(ds, split=data_config.tfds_train_split, **kw)
        test, _ = tfds_images(ds, split=data_config.tfds_test_split, **kw)
        shape = tuple(train[0]["x"].shape)
        desc = f"TFDS {ds}: train {len(train):,}, test {len(test):,}, images {shape}, {num_classes} classes"
        return ImageData(train, test, num_classes, shape, desc)
    raise ValueError(f"unknown data.name {name!r}; expected 'mixture2d', 'digits' or 'tfds:<name>'")

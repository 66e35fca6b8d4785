"""Image / 2-D data sources (mixture, digits, TFDS) through the grain pipeline, and the sample metrics."""

import numpy as np
import pytest

from kdjax import sample_metrics as sm
from kdjax.data import images, pipeline


# ---------------------------------------------------------------- 2-D mixture


def test_mixture_sampler_is_exact_and_classes_overlap():
    mix = images.ring_mixture(num_classes=4, components_per_class=2, std=0.3)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 20000)
    x = mix.sample(rng, labels)
    assert x.shape == (80000, 2) and x.dtype == np.float32
    for c in range(4):
        xc = x[labels == c]
        own = mix.means[mix.component_class == c]
        # Each class is an equal mixture of its components: its mean and second moment in closed form.
        np.testing.assert_allclose(xc.mean(0), own.mean(0), atol=5 * 1.0 / np.sqrt(len(xc)))
        second = (own[:, :, None] * own[:, None, :]).mean(0) + mix.std**2 * np.eye(2)
        np.testing.assert_allclose(xc.T @ xc / len(xc), second, atol=0.02)
    frac = sm.own_class_fraction(x, labels, means=mix.means, component_class=mix.component_class)
    np.testing.assert_allclose(frac, np.mean(mix.nearest_class(x) == labels))
    assert 0.5 < frac < 0.95  # overlapping: neither separable nor meaningless
    with pytest.raises(ValueError, match="labels"):
        mix.sample(rng, np.array([4]))


def test_mixture_sources_are_deterministic_and_held_out_differs():
    mix = images.ring_mixture()
    a, b, held = mix.source(size=100, seed=1), mix.source(size=100, seed=1), mix.source(size=100, seed=2)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.allclose(a.x, held.x)
    assert np.bincount(a.labels).tolist() == [25] * 4
    ex = a[3]
    assert ex["x"].shape == (2,) and ex["label"].dtype == np.int32 and ex["example_id"] == 3


# ---------------------------------------------------------------- digits


def test_digits_split_is_fixed_stratified_and_scaled():
    train, test = images.digits_split("train"), images.digits_split("test")
    assert len(train) + len(test) == 1797 and len(test) == images.DIGITS_TEST_SIZE
    assert train.x.shape[1:] == (8, 8, 1) and train.x.min() == -1.0 and train.x.max() == 1.0
    counts = np.bincount(test.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~36 per class
    np.testing.assert_array_equal(images.digits_split("test").x, test.x)  # fixed
    # No image is in both splits (digits has a few exact duplicates, so compare with multiplicity).
    from sklearn.datasets import load_digits

    total = len({row.tobytes() for row in load_digits().images.astype(np.float32)})
    union = {row.tobytes() for row in np.concatenate([train.x, test.x])}
    assert len(union) == total
    with pytest.raises(ValueError, match="split"):
        images.digits_split("validation")


def test_sources_work_with_the_grain_pipeline_and_resume():
    src = images.digits_split("train")
    ds = pipeline.train_dataset(src, batch_size=16, seed=3)
    it = pipeline.train_iterator(ds)
    first = [next(it) for _ in range(3)]
    assert first[0]["x"].shape == (16, 8, 8, 1) and first[0]["label"].shape == (16,)
    state = it.get_state()
    want = next(it)
    it2 = pipeline.train_iterator(ds)
    it2.set_state(state)
    got = next(it2)
    np.testing.assert_array_equal(got["x"], want["x"])
    np.testing.assert_array_equal(got["example_id"], want["example_id"])
    np.testing.assert_array_equal(src.x[want["example_id"]], want["x"])


# ---------------------------------------------------------------- TFDS images


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    import tensorflow_datasets as tfds

    class KdjaxTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            # A Tensor feature, not Image: PNG encoding needs TensorFlow, which kdjax does not depend on.
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(num_classes=3),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "test": self._generate_examples(3)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((4, 4, 1), 50 * i, np.uint8), "label": i % 3}

    data_dir = tmp_path_factory.mktemp("tfds")
    KdjaxTinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_images_prepared_dataset(tfds_dir):
    import ml_collections

    cfg = ml_collections.ConfigDict(
        dict(
            name="tfds:kdjax_tiny_images",
            tfds_data_dir=str(tfds_dir),
            tfds_image_key="image",
            tfds_label_key="label",
            tfds_train_split="train",
            tfds_test_split="test",
        )
    )
    data = images.load_from_config(cfg)
    assert data.num_classes == 3 and data.data_shape == (4, 4, 1) and len(data.train) == 6 and len(data.test) == 3
    seen = sorted((float(data.train[i]["x"][0, 0, 0]), int(data.train[i]["label"])) for i in range(6))
    assert [c for _, c in seen] == [i % 3 for i in range(6)]
    np.testing.assert_allclose([v for v, _ in seen], [50 * i / 127.5 - 1.0 for i in range(6)], rtol=1e-6)
    batch = next(pipeline.train_iterator(pipeline.train_dataset(data.train, batch_size=4, seed=0)))
    assert batch["x"].shape == (4, 4, 4, 1) and batch["x"].dtype == np.float32
    with pytest.raises(Exception, match="not found|kdjax_tiny_images"):
        images.tfds_images("kdjax_tiny_images", split="train", data_dir=tfds_dir / "elsewhere")


def test_tfds_images_mock_cifar10():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        src, num_classes = images.tfds_images("cifar10", split="train")
        ex = src[2]
    assert num_classes == 10 and len(src) == 5
    assert ex["x"].shape == (32, 32, 3) and -1.0 <= ex["x"].min() and ex["x"].max() <= 1.0


def test_unknown_data_name_is_an_error():
    import ml_collections

    with pytest.raises(ValueError, match="unknown data.name"):
        images.load_from_config(ml_collections.ConfigDict({"name": "mnist"}))


# ---------------------------------------------------------------- metrics


def test_sliced_wasserstein_properties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 3))
    assert sm.sliced_wasserstein(x, x) == 0.0
    assert sm.sliced_wasserstein(x, x[rng.permutation(500)]) == pytest.approx(0.0, abs=1e-12)
    # A shift by d: every projection moves by theta . d, so SW_2^2 = mean_theta (theta . d)^2 exactly.
    d = np.array([0.3, -0.2, 0.5])
    theta = np.random.default_rng(0).standard_normal((3, 256))
    theta /= np.linalg.norm(theta, axis=0)
    assert sm.sliced_wasserstein(x + d, x) == pytest.approx(np.sqrt(np.mean((d @ theta) ** 2)), rel=1e-9)
    # Different sizes: a subsample is close, a shifted set is far.
    assert sm.sliced_wasserstein(x, x[:250]) < 0.2 < sm.sliced_wasserstein(x + 1.0, x[:250])
    per = sm.sliced_wasserstein_per_class(x, np.arange(500) % 2, x + d, np.arange(500) % 2)
    assert set(per) == {0, 1}
    np.testing.assert_allclose(list(per.values()), sm.sliced_wasserstein(x + d, x), rtol=1e-9)


def test_frechet_distance_matches_the_gaussian_closed_form():
    # Diagonal covariances: FD = |mu_a - mu_b|^2 + sum (s_a - s_b)^2.
    mu_a, mu_b = np.array([0.0, 1.0]), np.array([1.0, -1.0])
    s_a, s_b = np.array([1.0, 2.0]), np.array([0.5, 3.0])
    fd = sm.frechet_distance_from_stats(mu_a, np.diag(s_a**2), mu_b, np.diag(s_b**2))
    assert fd == pytest.approx(np.sum((mu_a - mu_b) ** 2) + np.sum((s_a - s_b) ** 2), rel=1e-9)
    # Rotation invariance with full covariances.
    rot = np.array([[0.6, -0.8], [0.8, 0.6]])
    fd_rot = sm.frechet_distance_from_stats(
        rot @ mu_a, rot @ np.diag(s_a**2) @ rot.T, rot @ mu_b, rot @ np.diag(s_b**2) @ rot.T
    )
    assert fd_rot == pytest.approx(fd, rel=1e-9)
    feats = np.random.default_rng(1).standard_normal((300, 4))
    assert sm.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_diversity_and_classifier_scores():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((300, 2))
    pr = sm.precision_recall(real, real)
    assert pr == {"precision": 1.0, "recall": 1.0}
    collapsed = np.repeat(real[:1], 300, axis=0) + 1e-3 * rng.standard_normal((300, 2))
    pr = sm.precision_recall(real, collapsed)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.1  # on the manifold, covers almost none of it
    far = sm.precision_recall(real, real + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0}
    labels = np.arange(300) % 3
    assert sm.within_class_diversity(collapsed, labels) < 0.01 < sm.within_class_diversity(real, labels)
    # Exact small case: two points per class at distance 2 and 4.
    assert sm.within_class_diversity(np.array([[0.0], [2.0], [0.0], [4.0]]), np.array([0, 0, 1, 1])) == 3.0
    probs = np.array([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    scores = sm.classifier_scores(probs, np.array([0, 0, 1]))
    assert scores == {"accuracy": pytest.approx(1 / 3), "confidence": pytest.approx((0.7 + 0.4 + 0.1) / 3)}


def test_chunked_source_covers_every_example_and_flattens():
    src = images.digits_split("test")  # 360 examples
    chunked = images.ChunkedSource(src, 32, seed=5)
    assert len(chunked) == 12  # ceil(360 / 32): the last chunk wraps around, nothing is dropped
    ids = np.concatenate([chunked[i]["example_id"] for i in range(len(chunked))])
    assert sorted(set(ids.tolist())) == list(range(360)) and len(ids) == 384
    el = chunked[3]
    np.testing.assert_array_equal(el["x"], src.x[el["example_id"]])
    np.testing.assert_array_equal(el["label"], src.labels[el["example_id"]])
    batch = next(pipeline.train_iterator(pipeline.train_dataset(chunked, batch_size=4, seed=0)))
    assert batch["x"].shape == (4, 32, 8, 8, 1)
    flat = images.flatten_chunks(batch)
    assert flat["x"].shape == (128, 8, 8, 1) and flat["label"].shape == (128,)
    np.testing.assert_array_equal(flat["x"], src.x[flat["example_id"]])
    with pytest.raises(ValueError, match="chunk"):
        images.ChunkedSource(src, 0, seed=0)

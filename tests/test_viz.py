"""viz.image_grid on the labels real results have: learned, soft, unbalanced, too many or
too few images for the axes."""

from __future__ import annotations

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from kipnb import viz

NAMES = [f"c{i}" for i in range(10)]


def images(n, seed=0):
    return np.random.default_rng(seed).random((n, 6, 6, 1)).astype(np.float32)


def shown(fig):
    """(title, image id) of every axis that shows an image, row-major."""
    out = []
    for ax in fig.axes:
        if ax.images:
            out.append((ax.get_title(), float(ax.images[0].get_array().sum())))
    return out


def titles(fig):
    return [ax.get_title() for ax in fig.axes]


def teardown_function(_):
    plt.close("all")


def test_balanced_hard_labels_one_column_per_class():
    y = np.repeat(np.arange(10), 3)
    fig = viz.image_grid(images(30), y, NAMES)
    assert len(fig.axes) == 30
    assert titles(fig)[:10] == NAMES and titles(fig)[20:] == NAMES


@pytest.mark.parametrize("kind", ["regression", "logits"])
def test_learned_or_soft_labels_use_their_argmax(kind):
    cls = np.repeat(np.arange(10), 2)
    y = np.eye(10)[cls] - 0.1 if kind == "regression" else 3.0 * np.eye(10)[cls]
    y[5] = np.roll(y[5], 4)  # image 5 was made for class 2; its label drifted to class 6
    fig = viz.image_grid(images(20), y, NAMES)
    t = titles(fig)
    assert t.count("c6") == 3 and t.count("c2") == 1  # without classes: shown by label
    fig = viz.image_grid(images(20), y, NAMES, classes=cls)
    t = titles(fig)
    assert len(fig.axes) == 20
    assert "c2 → c6" in t and t.count("c6") == 2
    assert t.index("c2 → c6") % 10 == 2  # placed in the column of the class it was made for


def test_unbalanced_classes_leave_blanks():
    y = np.array([0, 0, 0, 0, 1, 2, 2])  # class 0 has 4, class 1 one, class 2 two
    fig = viz.image_grid(images(7), y)
    assert len(fig.axes) == 12  # 3 columns x 4 rows
    assert len(shown(fig)) == 7
    assert titles(fig)[:3] == ["0", "1", "2"] and titles(fig)[3:6] == ["0", "", "2"]


def test_the_crash_of_notebook_03_fewer_axes_than_a_class_needs():
    """More images of one class than rows of the given axes: extra images left out."""
    cls = np.repeat(np.arange(10), 3)
    learned = np.eye(10)[cls]
    learned[[4, 5]] = np.eye(10)[0]  # two class-1 images' labels now argmax to class 0
    fig, axes = plt.subplots(2, 10)
    viz.image_grid(images(30), learned, NAMES, axes=axes)  # argmax layout: class 0 has 5
    assert len(shown(fig)) == 2 * 10 - 1  # class 0 shows 2 of its 5, class 1 its one
    fig, axes = plt.subplots(2, 10)
    viz.image_grid(images(30), learned, NAMES, axes=axes, classes=cls)
    assert len(shown(fig)) == 20
    assert titles(fig)[11] == "c1 → c0" and titles(fig)[1] == "c1"


def test_more_axes_than_images_and_missing_class_keeps_its_column():
    y = np.array([0, 1, 3])  # class 2 absent
    fig, axes = plt.subplots(2, 4)
    viz.image_grid(images(3), y, axes=axes)
    assert titles(fig) == ["0", "1", "", "3", "", "", "", ""]


def test_unlabelled_and_one_dimensional_axes():
    fig = viz.image_grid(images(13))
    assert len(fig.axes) == 20 and len(shown(fig)) == 13
    fig, axes = plt.subplots(1, 5)
    viz.image_grid(images(13), axes=axes)  # more images than axes
    assert len(shown(fig)) == 5
    fig, axes = plt.subplots(1, 3)
    viz.image_grid(images(2), np.array([0, 7]), axes=axes)  # class 7 > columns: by rank
    assert titles(fig) == ["0", "7", ""]


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match="labels must be classes"):
        viz.image_grid(images(4), np.zeros((3,), int))
    with pytest.raises(ValueError, match="classes must be non-negative integer"):
        viz.image_grid(images(2), classes=np.array([0.5, 1.0]))

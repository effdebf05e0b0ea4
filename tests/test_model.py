"""The Keras AlexNet: architecture, LRN, grouped convolution, initialisation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from alexnet_tf import model as model_lib


@pytest.fixture(scope="module")
def paper_net():
    return model_lib.build_alexnet(1000, seed=0)


def test_parameter_count_is_the_papers(paper_net):
    assert paper_net.count_params() == 60_965_224
    # Without groups, conv2/4/5 see all maps of the layer below: 1,413,120 more weights.
    assert model_lib.build_alexnet(1000, grouped=False).count_params() == 60_965_224 + 1_413_120


def test_layer_names_and_shapes(paper_net):
    names = [l.name for l in paper_net.layers if l.name in model_lib.LAYER_NAMES]
    assert names == list(model_lib.LAYER_NAMES)
    shapes = {l.name: tuple(l.output.shape[1:]) for l in paper_net.layers}
    assert shapes["conv1"] == (55, 55, 96)  # Only from a 227x227 input.
    assert shapes["norm1"] == (55, 55, 96)
    assert shapes["pool1"] == (27, 27, 96)
    assert shapes["conv2"] == (27, 27, 256)
    assert shapes["pool2"] == (13, 13, 256)
    assert shapes["conv3"] == shapes["conv4"] == (13, 13, 384)
    assert shapes["conv5"] == (13, 13, 256)
    assert shapes["pool5"] == (6, 6, 256)
    assert shapes["fc6"] == shapes["fc7"] == (4096,)
    assert shapes["fc8"] == (1000,)
    assert paper_net.input_shape == (None, 227, 227, 3)
    kernels = {l.name: tuple(l.kernel.shape) for l in paper_net.layers if hasattr(l, "kernel")}
    assert kernels["conv2"] == (5, 5, 48, 256)  # Two groups of 48 input maps.
    assert kernels["conv3"] == (3, 3, 256, 384)  # conv3 sees both groups.
    assert kernels["conv4"] == (3, 3, 192, 384) and kernels["conv5"] == (3, 3, 192, 256)


def _lrn_numpy(a, k=2.0, n=5, alpha=1e-4, beta=0.75):
    """The formula of §3.3 written out: sums over max(0, i-n/2)..min(N-1, i+n/2)."""
    out = np.empty_like(a)
    channels = a.shape[-1]
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        out[..., i] = a[..., i] / (k + alpha * np.sum(a[..., lo : hi + 1] ** 2, axis=-1)) ** beta
    return out


def test_lrn_matches_the_papers_formula():
    a = np.random.default_rng(0).uniform(0, 60, (2, 4, 4, 12)).astype(np.float32)
    got = model_lib.LocalResponseNormalization()(a).numpy()
    np.testing.assert_allclose(got, _lrn_numpy(a.astype(np.float64)), rtol=1e-5)
    # alpha is not divided by n: with alpha/n the result would differ clearly.
    assert not np.allclose(got, _lrn_numpy(a.astype(np.float64), alpha=1e-4 / 5), rtol=1e-3)
    other = model_lib.LocalResponseNormalization(k=1.0, n=3, alpha=1e-3, beta=0.5)(a).numpy()
    np.testing.assert_allclose(other, _lrn_numpy(a.astype(np.float64), 1.0, 3, 1e-3, 0.5), rtol=1e-5)


def test_lrn_rejects_even_sizes():
    with pytest.raises(ValueError, match="odd"):
        model_lib.LocalResponseNormalization(n=4)


def test_grouped_conv_equals_keras_grouped_conv2d():
    x = tf.random.stateless_normal((2, 13, 13, 8), seed=(1, 2))
    ours = model_lib.GroupedConv2D(6, 3, groups=2, padding="same", bias_initializer="random_normal")
    y = ours(x)
    ref = keras.layers.Conv2D(6, 3, groups=2, padding="same")
    ref.build(x.shape)
    ref.set_weights(ours.get_weights())  # Same shapes, same layout.
    np.testing.assert_allclose(y.numpy(), ref(x).numpy(), rtol=1e-5, atol=1e-5)
    strided = model_lib.GroupedConv2D(4, 5, groups=2, strides=2)
    ref2 = keras.layers.Conv2D(4, 5, groups=2, strides=2)
    y2 = strided(x)
    ref2.build(x.shape)
    ref2.set_weights(strided.get_weights())
    np.testing.assert_allclose(y2.numpy(), ref2(x).numpy(), rtol=1e-5, atol=1e-5)
    assert strided.compute_output_shape(x.shape) == tuple(y2.shape)


def test_initialisation_follows_section_5(paper_net):
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for layer in paper_net.layers:
        if not hasattr(layer, "kernel"):
            continue
        w = layer.kernel.numpy()
        assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.01) < 5e-4, layer.name
        expected = 1.0 if layer.name in ones else 0.0
        np.testing.assert_array_equal(layer.bias.numpy(), expected)


def test_saved_and_reloaded_model_gives_the_same_outputs(tmp_path):
    net = model_lib.build_alexnet(10, seed=1)
    x = tf.random.stateless_normal((2, 227, 227, 3), seed=(3, 4)) * 50
    path = str(tmp_path / "alexnet.keras")
    net.save(path)
    again = keras.models.load_model(path)
    assert isinstance(again.get_layer("norm1"), model_lib.LocalResponseNormalization)
    assert isinstance(again.get_layer("conv2"), model_lib.GroupedConv2D)
    np.testing.assert_allclose(again(x, training=False).numpy(), net(x, training=False).numpy(), rtol=1e-5)


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    net = model_lib.build_alexnet(10, seed=2, dropout=0.0)
    x = tf.random.stateless_normal((8, 227, 227, 3), seed=(5, 6)) * 50
    y = tf.constant([0, 1, 2, 3, 4, 5, 6, 7])
    opt = keras.optimizers.SGD(1e-3, momentum=0.9)

    def loss():
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, net(x, training=True),
                                                                           from_logits=True))

    before = float(loss())
    with tf.GradientTape() as tape:
        value = loss()
    opt.apply_gradients(zip(tape.gradient(value, net.trainable_variables), net.trainable_variables))
    assert float(loss()) < before

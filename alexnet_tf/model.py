"""AlexNet (Krizhevsky, Sutskever and Hinton, 2012) as a functional Keras model.

Faithful to the paper by default: grouped conv2/conv4/conv5 (the two-GPU
split of §3.2), local response normalisation (§3.3), overlapping pooling
(§3.4), dropout 0.5 in fc6/fc7 (§4.2), N(0, 0.01) weights and the paper's
bias initialisation (§5). At 1000 classes the model has 60,965,224 parameters.

    model = build_alexnet(num_classes=1000)            # the paper's net
    model = build_alexnet(num_classes=10, grouped=False)  # single-tower variant
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from alexnet_tf import recipes
from tfrecords import schema

INPUT_SIZE = schema.CROP  # 227, not the 224 the paper's text says (see schema.CROP).

LAYER_NAMES = (
    "conv1", "norm1", "pool1", "conv2", "norm2", "pool2", "conv3", "conv4", "conv5",
    "pool5", "fc6", "drop6", "fc7", "drop7", "fc8",
)


@keras.saving.register_keras_serializable(package="alexnet_tf")
class LocalResponseNormalization(layers.Layer):
    """§3.3: b = a / (k + alpha * sum of a^2 over n adjacent maps)^beta.

    The defaults are the paper's: k=2, n=5, alpha=1e-4, beta=0.75, with alpha
    *not* divided by n (as in the paper's formula and TensorFlow's LRN op).
    Channels last.
    """

    def __init__(self, k: float = 2.0, n: int = 5, alpha: float = 1e-4, beta: float = 0.75, **kwargs):
        super().__init__(**kwargs)
        if n < 1 or n % 2 == 0:
            raise ValueError(f"LRN size n must be odd and positive, got {n}")
        self.k, self.n, self.alpha, self.beta = float(k), int(n), float(alpha), float(beta)

    def call(self, x):
        # TensorFlow's op sums over [c - r, c + r] with r = n // 2, the paper's window.
        y = tf.nn.local_response_normalization(
            tf.cast(x, tf.float32), depth_radius=self.n // 2, bias=self.k, alpha=self.alpha, beta=self.beta
        )
        return tf.cast(y, x.dtype)  # In float32: the sum of squares overflows float16.

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "k": self.k, "n": self.n, "alpha": self.alpha, "beta": self.beta}


@keras.saving.register_keras_serializable(package="alexnet_tf")
class GroupedConv2D(layers.Layer):
    """A grouped convolution computed as one convolution per group.

    The same mathematics and parameters as `Conv2D(groups=g)` (its kernel has
    the same shape, (kh, kw, in/g, out), and the same layout: output channels
    [i*out/g, (i+1)*out/g) see input channels [i*in/g, (i+1)*in/g)), so
    weights move between the two unchanged. Keras runs `groups>1` through XLA
    on CPU, which is several times slower than g ordinary convolutions.
    """

    def __init__(self, filters, kernel_size, groups=2, strides=1, padding="valid", activation=None,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", kernel_regularizer=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.filters, self.groups = int(filters), int(groups)
        self.kernel_size = tuple(kernel_size) if isinstance(kernel_size, (list, tuple)) else (kernel_size,) * 2
        self.strides = tuple(strides) if isinstance(strides, (list, tuple)) else (strides,) * 2
        self.padding = padding.upper()
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        if self.filters % self.groups:
            raise ValueError(f"filters={filters} is not divisible by groups={groups}")

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.groups:
            raise ValueError(f"{channels} input channels are not divisible by groups={self.groups}")
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.kernel_size, channels // self.groups, self.filters),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer=self.bias_initializer)

    def call(self, x):
        xs = tf.split(x, self.groups, axis=-1)
        ks = tf.split(tf.cast(self.kernel, x.dtype), self.groups, axis=-1)
        y = tf.concat(
            [tf.nn.conv2d(xi, ki, strides=self.strides, padding=self.padding) for xi, ki in zip(xs, ks)], axis=-1
        )
        y = tf.nn.bias_add(y, tf.cast(self.bias, y.dtype))
        return self.activation(y)

    def compute_output_shape(self, input_shape):
        h, w = input_shape[1], input_shape[2]
        (kh, kw), (sh, sw) = self.kernel_size, self.strides

        def out(size, k, s):
            if size is None:
                return None
            return (size - k) // s + 1 if self.padding == "VALID" else -(-size // s)

        return (input_shape[0], out(h, kh, sh), out(w, kw, sw), self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "groups": self.groups,
            "strides": self.strides,
            "padding": self.padding.lower(),
            "activation": keras.activations.serialize(self.activation),
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
        }


def build_alexnet(
    num_classes: int = 1000,
    grouped: bool = True,
    input_size: int = INPUT_SIZE,
    dropout: float = 0.5,
    seed: int | None = None,
    dtype: str | None = None,
    init: dict | None = None,
) -> keras.Model:
    """Builds AlexNet; the model maps (batch, size, size, 3) images to logits.

    Args:
      num_classes: Width of fc8.
      grouped: The paper's two-group conv2/conv4/conv5 (True) or the
        single-tower net with full connections between maps (False).
      input_size: Side of the square input (227, see INPUT_SIZE).
      dropout: Dropout rate of fc6 and fc7 (§4.2: 0.5).
      seed: Seed of the weight initialisers and the dropout masks (None: random).
      dtype: Keras dtype policy of the layers: "float32", "mixed_float16",
        "mixed_bfloat16" (variables float32, compute in 16 bits), or None for
        Keras' global policy. LRN and the logits compute in float32 always.
      init: Each layer's (weight std, bias constant): a recipe's
        (`recipes.RECIPES[...].init`); default the paper's (§5).

    Returns:
      A functional `keras.Model` named "alexnet", with layers named as in
      `LAYER_NAMES`.
    """
    counter = iter(range(100))
    table = init or recipes.PAPER.init
    if set(table) != set(recipes.LAYERS):
        raise ValueError(f"init must give (std, bias) for exactly {', '.join(recipes.LAYERS)}")

    def weights(name):
        # Zero-mean Gaussians (§5: standard deviation 0.01 everywhere), seeded in layer order.
        return keras.initializers.RandomNormal(0.0, table[name][0], seed=None if seed is None else seed + next(counter))

    def bias(name):
        # §5: 1 in conv2, conv4, conv5, fc6, fc7 (ReLUs start active), 0 in the others.
        return keras.initializers.Constant(table[name][1])

    def conv(name, filters, size, strides=1, padding="same", groups=1):
        if groups > 1:
            return GroupedConv2D(filters, size, groups=groups, strides=strides, padding=padding, activation="relu",
                                 kernel_initializer=weights(name), bias_initializer=bias(name), name=name, dtype=dtype)
        return layers.Conv2D(filters, size, strides=strides, padding=padding, activation="relu",
                             kernel_initializer=weights(name), bias_initializer=bias(name), name=name, dtype=dtype)

    g = 2 if grouped else 1
    x = inputs = keras.Input((input_size, input_size, 3), name="image")
    x = conv("conv1", 96, 11, strides=4, padding="valid")(x)  # 55x55x96
    x = LocalResponseNormalization(name="norm1", dtype=dtype)(x)
    x = layers.MaxPooling2D(3, 2, name="pool1", dtype=dtype)(x)  # §3.4: overlapping, z=3, s=2 -> 27x27
    x = conv("conv2", 256, 5, groups=g)(x)
    x = LocalResponseNormalization(name="norm2", dtype=dtype)(x)
    x = layers.MaxPooling2D(3, 2, name="pool2", dtype=dtype)(x)  # 13x13
    x = conv("conv3", 384, 3)(x)  # conv3 sees both groups (§3.5).
    x = conv("conv4", 384, 3, groups=g)(x)
    x = conv("conv5", 256, 3, groups=g)(x)
    x = layers.MaxPooling2D(3, 2, name="pool5", dtype=dtype)(x)  # 6x6x256
    x = layers.Flatten(name="flatten", dtype=dtype)(x)
    x = layers.Dense(4096, activation="relu", kernel_initializer=weights("fc6"), bias_initializer=bias("fc6"),
                     name="fc6", dtype=dtype)(x)
    x = layers.Dropout(dropout, name="drop6", dtype=dtype, seed=None if seed is None else seed + 50)(x)
    x = layers.Dense(4096, activation="relu", kernel_initializer=weights("fc7"), bias_initializer=bias("fc7"),
                     name="fc7", dtype=dtype)(x)
    x = layers.Dropout(dropout, name="drop7", dtype=dtype, seed=None if seed is None else seed + 51)(x)
    logits = layers.Dense(num_classes, kernel_initializer=weights("fc8"), bias_initializer=bias("fc8"), name="fc8",
                          dtype="float32")(x)  # float32 logits also under mixed precision.
    return keras.Model(inputs, logits, name="alexnet")

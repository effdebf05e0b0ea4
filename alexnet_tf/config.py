"""The training hyperparameters and presets, defined once.

`TrainConfig`'s fields are the hyperparameters; each field's `help` metadata is
the text of the command-line flag `alexnet_tf.train` defines from it, so a new
hyperparameter is one field here and nothing else. Defaults are the paper's (§5).
"""

from __future__ import annotations

import dataclasses
import math

from alexnet_tf import recipes

MIXED_PRECISION = ("off", "auto", "float16", "bfloat16")


def _field(default, help: str, choices: tuple[str, ...] | None = None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


class ConfigError(ValueError):
    """A setting that cannot work with these records or devices (found before anything is written)."""


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters; defaults are the paper's."""

    data_dir: str = _field("data", "Records folder written by pipelines.build_tfrecords.")
    recipe: str = _field("paper", "Initialisation, per-parameter learning rates, weight-decay targets and schedule "
                         "as recorded by: paper (§5), caffe (BVLC bvlc_alexnet: biases 0.1, fc6/fc7 N(0, 0.005), "
                         "biases at 2x the learning rate), cuda_convnet2 (Krizhevsky's later code: conv3-5 "
                         "N(0, 0.03), biases 2-50x the learning rate, dexp schedule); see alexnet_tf/recipes.py. "
                         "A --preset and explicit flags override its schedule values.", tuple(recipes.RECIPES))
    batch_size: int = _field(128, "Global batch size, split over the replicas (§5: 128).")
    epochs: int = _field(90, "Epochs (§5: roughly 90 cycles).")
    learning_rate: float = _field(0.01, "Initial learning rate (§5: 0.01).")
    momentum: float = _field(0.9, "SGD momentum (§5: 0.9).")
    weight_decay: float = _field(5e-4, "Weight decay on the kernels, inside the momentum update (§5: 0.0005).")
    lr_schedule: str = _field("plateau", "plateau: divide by 10 when the validation error stops improving (§5); "
                              "step: at --lr_decay_epochs; dexp: cuda-convnet2's, --lr_steps rates from the "
                              "learning rate down to it / --lr_final_factor, each for an equal share of --epochs.",
                              ("plateau", "step", "dexp"))
    lr_patience: int = _field(1, "Plateau: epochs without a new best validation top-1 error before dividing.")
    max_lr_decays: int = _field(3, "Plateau: divide at most this many times (§5: reduced three times).")
    lr_decay_epochs: tuple[int, ...] = _field((30, 60, 80), "Step: epochs to divide the learning rate at.")
    lr_final_factor: float = _field(250.0, "Dexp: the last rate is the learning rate / this.")
    lr_steps: int = _field(4, "Dexp: number of rates.")
    # Not in the paper (0 keeps it faithful): ramp the learning rate up linearly
    # over the first epochs (Goyal et al., 2017).
    warmup_epochs: float = _field(0.0, "Linear learning-rate warm-up in epochs (not in the paper; 0 = off).")
    # Not in the paper (off keeps §5's rule): the velocity built at the old rate
    # carries the weights on after a drop (Goyal et al., 2017, §2.2).
    momentum_correction: bool = _field(
        False, "When an epoch's end changes the learning rate (or a recipe's bias multiplier), scale the momentum "
        "by the new rate over the old, so that a drop takes effect at once (not in the paper; off = §5's rule).")
    dropout: float = _field(0.5, "Dropout rate of fc6 and fc7 (§4.2: 0.5).")
    grouped: bool = _field(True, "The paper's two-group conv2/conv4/conv5 (--nogrouped: one tower).")
    mean: str = _field("image", "Subtract the mean image (§2) or the mean colour.", ("image", "rgb"))
    mixed_precision: str = _field(
        "auto", "Compute precision; variables stay float32. float16: dynamic loss scaling (GPUs); bfloat16: "
        "none (GPUs from Ampere on, CPUs with AVX512-BF16 or AMX); off: float32 (the paper); auto: float16 "
        "on GPUs, bfloat16 on CPUs that compute it natively, else float32.", MIXED_PRECISION)
    jit_compile: bool = _field(False, "Compile each replica's forward and backward pass with XLA.")
    steps_per_loop: int = _field(100, "Training steps run on the device per call from the host; the host reads "
                                 "the metrics, updates the progress bar and checkpoints between calls.")
    checkpoint_every_steps: int = _field(1000, "Checkpoint every N steps (and at every epoch end).")
    eval_batch_size: int = _field(0, "Evaluation batch size (0: --batch_size).")
    shuffle_buffer: int = _field(10_000, "Records in the shuffle buffer.")
    seed: int | None = _field(None, "Seed of initialisation, dropout, data order and augmentation (default: random).")
    deterministic: bool = _field(False, "With --seed: the same run, or one killed and resumed, gives the same "
                                 "weights and metrics, bit for bit (deterministic kernels, float sums in a fixed "
                                 "order).")
    data_service: str = _field("", "grpc://HOST:PORT of a tf.data service dispatcher (python -m "
                                "alexnet_tf.data_service): its workers read, decode and crop the training records, "
                                "each at most once per epoch; empty: this host's own input stream.")
    data_service_timeout: float = _field(300.0, "Seconds a trainer waits for a --data_service dispatcher that stops "
                                         "answering while it reads from it: one back within that time (restarted "
                                         "with the same --work_dir) carries the run on; after it the run ends with "
                                         "exit status 1, its checkpoints kept (0: wait for ever).")
    steps_per_epoch: int = _field(0, "Steps per epoch (0: training examples // batch size).")
    profile_steps: tuple[int, ...] = _field((), "first,last global step to trace with the TensorFlow profiler.")
    log_images: int = _field(16, "Augmented training images per epoch in TensorBoard (0: none).")
    histograms: bool = _field(True, "Weight histograms in TensorBoard.")
    histogram_every: int = _field(1, "Write weight histograms every this many epochs (AlexNet's 61M weights: "
                                     "about 1 s on 2 CPU cores).")
    figures: bool = _field(True, "TensorBoard each epoch: the conv1 kernels (the paper's Figure 3), fixed "
                           "validation images with their top-5 and their fc7 nearest neighbours (Figure 4), "
                           "per-class validation error.")
    figure_pool: int = _field(500, "Validation images (the first of the split) the fc7 neighbours are searched in.")
    # BVLC/caffe#401: 3 of 8 runs of Caffe's ImageNet example stalled at 6.9; the
    # advice there is to restart one that has not moved after 5000 iterations
    # of 256 images (one epoch, 10,000 steps of 128), and one run moved only
    # after 8000.
    stall_steps: int = _field(10_000, "Warn when the training loss is still no better than chance, above (1 - "
                              "--stall_margin) x ln(classes), after this many steps (0: never); a non-finite "
                              "loss warns at once.")
    stall_margin: float = _field(0.05, "Share of ln(classes) the loss must have come down by to count as learning.")
    stop_if_stalled: bool = _field(False, "End the run (exit status 3, checkpoints kept) instead of only warning.")
    export: bool = _field(True, "Export a SavedModel into <model_dir>/saved_model at the end.")
    verbose: bool = _field(True, "Progress bar and per-epoch lines on the console.")

    def __post_init__(self):
        self._check()

    def _check(self) -> None:
        """Raises ValueError naming the first setting that cannot work (the flag's name, its value, the range)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if self.mixed_precision is True or self.mixed_precision is False:  # The old boolean form.
            self.mixed_precision = "auto" if self.mixed_precision else "off"
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                             f"got {self.mixed_precision!r}")
        for name in ("batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_batch_size", "steps_per_epoch", "checkpoint_every_steps", "log_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not self.learning_rate >= 0:
            raise ValueError(f"learning_rate must be 0 or more, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1) (the share of fc6/fc7 units dropped), got {self.dropout}")
        for name in ("weight_decay", "warmup_epochs", "data_service_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("lr_patience", "histogram_every", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_lr_decays < 0 or any(e < 1 for e in self.lr_decay_epochs):
            raise ValueError(f"max_lr_decays must be 0 or more and lr_decay_epochs at least 1, got "
                             f"{self.max_lr_decays} and {list(self.lr_decay_epochs)}")
        recipes.get(self.recipe)
        if self.lr_steps < 2 or not self.lr_final_factor > 0:
            raise ValueError(f"lr_steps must be at least 2 and lr_final_factor above 0, got {self.lr_steps} and "
                             f"{self.lr_final_factor}")
        if self.stall_steps < 0 or not 0 <= self.stall_margin < 1:
            raise ValueError(f"stall_steps must be 0 or more and stall_margin in [0, 1), got {self.stall_steps} "
                             f"and {self.stall_margin}")
        if self.figure_pool < 1:
            raise ValueError(f"figure_pool must be at least 1, got {self.figure_pool}")
        if self.steps_per_loop < 1:
            raise ValueError(f"steps_per_loop must be at least 1, got {self.steps_per_loop}")
        if self.deterministic and self.seed is None:
            raise ValueError("deterministic needs a seed: give --seed")
        if self.deterministic and self.data_service:
            raise ValueError("deterministic cannot use data_service: the service's workers hand on batches in "
                             "the order they finish them; drop --data_service for a reproducible run")
        if self.profile_steps and len(self.profile_steps) != 2:
            raise ValueError(f"profile_steps takes two numbers (first, last), got {self.profile_steps}")


# Hyperparameters that learn the embedded sample (10 classes, 400 images) on a
# 2-core CPU within minutes; the paper's values stay the defaults.
PRESETS = {
    "paper": {},
    "sample": {
        # Krizhevsky's cuda-convnet2 initialisation (fc biases of 1 on fewer
        # layers than the paper's, larger conv3-5 weights) leaves chance level
        # by the third epoch here, where the paper's takes about ten; batches of
        # 16 give twice the steps of 32 for the same images.
        "recipe": "cuda_convnet2",
        "batch_size": 16,
        # Eight epochs, the last at a tenth of the rate with the momentum
        # corrected: 88-89% validation top-1 in three seeded runs (docs/training.md).
        "epochs": 8,
        # With these initialisations learning rates above ~0.002 blow the first
        # steps up on ten classes (each class a large share of every batch's
        # gradient), so 0.001, and no dropout to learn fast.
        "learning_rate": 0.001,
        "dropout": 0.0,
        "lr_schedule": "step",
        "lr_decay_epochs": (7,),
        # Without it the loss rises for most of the epoch after the drop.
        "momentum_correction": True,
        "checkpoint_every_steps": 100,
        "shuffle_buffer": 1000,
        "log_images": 8,
        "histogram_every": 8,  # Once, after the last epoch (61M weights).
        # The loss sits at or above chance (ln 10) for the first two epochs;
        # 120 steps is epoch 5 of 8.
        "stall_steps": 120,
    },
}



def make_config(preset: str = "paper", recipe: str | None = None, **explicit) -> TrainConfig:
    """A TrainConfig as `alexnet_tf.train` makes one: the recipe's values, then the preset's, then `explicit`.

    The recipe is `recipe`, else the preset's, else the paper's.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    name = recipe or PRESETS[preset].get("recipe", "paper")
    values = {**recipes.get(name).config, **PRESETS[preset], **explicit, "recipe": name}
    return TrainConfig(**values)

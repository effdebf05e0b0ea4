"""The three recorded ways AlexNet was trained, as named recipes (`--recipe`), and the learning-rate schedule.

Each recipe fixes what its source records beyond the network itself: every
layer's initialisation, the biases' learning rate relative to the weights',
which parameters weight decay acts on, and the schedule. The network (layers,
names, parameter count) is the same under every recipe.

Sources:
- paper: Krizhevsky, Sutskever, Hinton (2012), §5.
- caffe: BVLC Caffe, models/bvlc_alexnet/ (readme.md, train_val.prototxt,
  solver.prototxt). The readme: biases of 0.1 instead of 1, "as
  initialization to 1 gave flat loss"; 57.1% / 80.2% top-1 / top-5
  centre-crop accuracy on ILSVRC-2012 validation.
- cuda_convnet2: Krizhevsky's cuda-convnet2, layers/layers-223-1gpu.cfg
  (initW, initB) and layers/layer-params-223-ce2-1gpu.cfg (epsW, epsB, wc);
  schedules as cudaconvnet/src/lr.cu computes them. That configuration's
  own network is narrower (64/192/384/256/256 maps); only its training
  values are taken here.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Callable

if typing.TYPE_CHECKING:
    from alexnet_tf.config import TrainConfig
    from alexnet_tf.run_state import LoopState

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
IMAGENET_TRAIN_IMAGES = 1_281_167


def dexp(progress: float, base: float, factor: float, steps: int) -> float:
    """cuda-convnet2's "dexp" schedule at `progress` (0..1 of the run).

    `steps` rates from `base` down to `base / factor`, evenly spaced in log
    (base * factor^(-i/(steps-1))), each held for 1/steps of the run; at a
    boundary the earlier rate still holds (cudaconvnet/src/lr.cu).
    """
    rates = [base * factor ** (-i / (steps - 1)) for i in range(steps - 1)] + [base / factor]
    for i, rate in enumerate(rates):
        if progress <= (i + 1) / steps:
            return rate
    return rates[-1]


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    init: dict  # layer -> (weight std, bias constant).
    decay_biases: bool  # Whether weight decay also acts on the biases.
    config: dict  # TrainConfig values the recipe sets (a preset and explicit flags override them).
    # The biases' learning rate over the weights' at progress (0..1) of the run;
    # None: equal rates (the training step then has no multiplier at all).
    bias_lr: Callable[[float], float] | None

    def bias_lr_multiplier(self, progress: float) -> float:
        """The biases' learning rate over the weights' at `progress` (0..1) of the run."""
        return 1.0 if self.bias_lr is None else self.bias_lr(progress)

    def bias_lr_in_epoch(self, epoch: int, epochs: int) -> float:
        """The multiplier through 0-based `epoch` of `epochs`: its start's progress (schedules move per epoch)."""
        return self.bias_lr_multiplier(epoch / epochs)


def is_bias(variable) -> bool:
    """Whether a trainable variable is a layer's bias (the recipes' per-parameter rules tell them apart)."""
    return variable.path.endswith("bias")


def _convnet2_bias_lr(progress: float) -> float:
    # layer-params-223-ce2-1gpu.cfg: epsW=dexp[base=0.01;tgtFactor=250;numSteps=4],
    # epsB=dexp[base=0.02;tgtFactor=10;numSteps=2], on every layer.
    return dexp(progress, 0.02, 10, 2) / dexp(progress, 0.01, 250, 4)


PAPER = Recipe(
    name="paper",
    source="Krizhevsky et al. (2012), §5",
    # §5: weights N(0, 0.01) everywhere; biases 1 in conv2, conv4, conv5 and the
    # fully connected hidden layers, 0 in the others.
    init={"conv1": (0.01, 0.0), "conv2": (0.01, 1.0), "conv3": (0.01, 0.0), "conv4": (0.01, 1.0),
          "conv5": (0.01, 1.0), "fc6": (0.01, 1.0), "fc7": (0.01, 1.0), "fc8": (0.01, 0.0)},
    # §5's update rule decays "the weight w"; cuda-convnet, the paper's code, decays weights only.
    decay_biases=False,
    bias_lr=None,  # §5: "an equal learning rate for all layers".
    # §5: batch 128, momentum 0.9, decay 0.0005, lr 0.01 divided by 10 when the
    # validation error stopped improving, three times, about 90 cycles.
    config={"batch_size": 128, "learning_rate": 0.01, "lr_schedule": "plateau", "max_lr_decays": 3, "epochs": 90},
)

CAFFE = Recipe(
    name="caffe",
    source="BVLC Caffe models/bvlc_alexnet",
    # train_val.prototxt: gaussian std 0.01, but 0.005 on fc6 and fc7; bias 0.1
    # where the paper has 1 (readme: 1 "gave flat loss"), 0 elsewhere.
    init={"conv1": (0.01, 0.0), "conv2": (0.01, 0.1), "conv3": (0.01, 0.0), "conv4": (0.01, 0.1),
          "conv5": (0.01, 0.1), "fc6": (0.005, 0.1), "fc7": (0.005, 0.1), "fc8": (0.01, 0.0)},
    decay_biases=False,  # train_val.prototxt: decay_mult 0 on every bias.
    bias_lr=lambda progress: 2.0,  # train_val.prototxt: lr_mult 2 on every bias, 1 on every weight.
    # solver.prototxt: base_lr 0.01, "step" with gamma 0.1 every 100,000
    # iterations, 450,000 iterations, batch 256 (train_val.prototxt): with
    # ImageNet's 1,281,167 training images, a step every 20 epochs and 90 epochs.
    config={"batch_size": 256, "learning_rate": 0.01, "lr_schedule": "step", "lr_decay_epochs": (20, 40, 60, 80),
            "epochs": 90},
)

CUDA_CONVNET2 = Recipe(
    name="cuda_convnet2",
    source="cuda-convnet2 layers/layers-223-1gpu.cfg, layers/layer-params-223-ce2-1gpu.cfg",
    # layers-223-1gpu.cfg: initW 0.01 on conv1, conv2 and the fully connected
    # layers, 0.03 on conv3-5; initB 1 on conv2, conv4, conv5 and both 4096
    # layers, -7 on the 1000-way layer, 0 (the default) on conv1 and conv3.
    init={"conv1": (0.01, 0.0), "conv2": (0.01, 1.0), "conv3": (0.03, 0.0), "conv4": (0.03, 1.0),
          "conv5": (0.03, 1.0), "fc6": (0.01, 1.0), "fc7": (0.01, 1.0), "fc8": (0.01, -7.0)},
    decay_biases=False,  # wc=0.0005 is the weights' decay; biases have none.
    bias_lr=_convnet2_bias_lr,
    # epsW=dexp[base=0.01;tgtFactor=250;numSteps=4]: 0.01, then / 250^(1/3) at
    # 25%, 50% and 75% of the run, 0.00004 at the end; momW 0.9.
    config={"batch_size": 128, "learning_rate": 0.01, "lr_schedule": "dexp", "lr_final_factor": 250.0,
            "lr_steps": 4, "epochs": 90},
)

RECIPES = {r.name: r for r in (PAPER, CAFFE, CUDA_CONVNET2)}


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
    return RECIPES[name]


def chance_loss(num_classes: int) -> float:
    """The cross-entropy of a network that has learned nothing: ln(classes)."""
    return math.log(num_classes)


# ---------------------------------------------------------------------------
# The schedule: the learning rate after each epoch.


def learning_rate_after_epoch(config: TrainConfig, epoch: int, lr: float, val_error: float | None,
                              best: float, bad_epochs: int, decays: int) -> tuple[float, float, int, int]:
    """The schedule: returns (lr, best, bad_epochs, decays) for the next epoch.

    Args:
      epoch: The epoch just finished, 0-based.
      val_error: Its validation top-1 error, or None without a validation split
        (the plateau schedule then keeps the rate).
    """
    if config.lr_schedule == "dexp":  # Each epoch at the rate its start's share of the run gives.
        rate = dexp((epoch + 1) / config.epochs, config.learning_rate, config.lr_final_factor, config.lr_steps)
        return rate, min(best, math.inf if val_error is None else val_error), 0, decays
    if config.lr_schedule == "step":
        decays = sum(1 for e in config.lr_decay_epochs if e <= epoch + 1)
        return config.learning_rate * 0.1**decays, min(best, math.inf if val_error is None else val_error), 0, decays
    if val_error is None:
        return lr, best, bad_epochs, decays
    if val_error < best:
        return lr, val_error, 0, decays
    bad_epochs += 1
    if bad_epochs >= config.lr_patience and decays < config.max_lr_decays:
        return lr / 10.0, best, 0, decays + 1
    return lr, best, bad_epochs, decays


def next_epoch(config: TrainConfig, state: LoopState, optimizer, result: dict, recipe: Recipe | None = None,
               variables=()) -> None:
    """Applies the schedule after an epoch (`result`) and resets the epoch's counters in `state`.

    With `config.momentum_correction`, also scales the momentum of `variables`
    (the optimizer's, in its order) by each parameter's new rate over its old
    (`correct_momentum`): the weights' rate from the schedule, the biases' with
    `recipe`'s bias multiplier for the next epoch over this one's.
    """
    finished = int(state.epoch)
    lr, best, bad, decays = learning_rate_after_epoch(
        config, finished, result["learning_rate"], result.get("val_top1_error"),
        float(state.best_val_error.numpy()), int(state.bad_epochs), int(state.lr_decays))
    if config.momentum_correction and result["learning_rate"] > 0:
        weights = lr / result["learning_rate"]
        biases = weights
        if recipe is not None:
            biases *= (recipe.bias_lr_in_epoch(finished + 1, config.epochs)
                       / recipe.bias_lr_in_epoch(finished, config.epochs))
        correct_momentum(optimizer, variables, weights, biases)
    state.learning_rate.assign(lr)
    optimizer.learning_rate.assign(lr)
    state.best_val_error.assign(best)
    state.bad_epochs.assign(bad)
    state.lr_decays.assign(decays)
    state.epoch.assign_add(1)
    state.step_in_epoch.assign(0)
    state.sums.assign([0.0, 0.0, 0.0, 0.0])
    state.train_seconds.assign(0.0)


def correct_momentum(optimizer, variables, weights: float, biases: float) -> None:
    """Scales SGD's velocity of each of `variables` by its rate's change: `biases` for biases, `weights` for the rest.

    §5's update, v <- 0.9 v - eps (g + 0.0005 w), w <- w + v (Keras's SGD too),
    keeps in v the steps of the old rate eps. After a drop to eps/10 the old
    velocity carries the weights on at the old step size while the gradient
    pulls back ten times more weakly: along steep directions the weights swing
    further out, and the loss rises for an epoch. Scaling v by eps_new/eps_old
    at the change ("momentum correction", Goyal et al., 2017, §2.2) makes the
    update what it would have been had the new rate always held.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # Under loss scaling.
    velocities = list(inner.momentums)
    if not velocities:  # Momentum 0: SGD keeps no velocity.
        return
    if len(velocities) != len(variables):
        raise ValueError(f"the optimizer has {len(velocities)} momentum slots for {len(variables)} variables")
    for variable, velocity in zip(variables, velocities):
        ratio = biases if is_bias(variable) else weights
        if ratio != 1.0:
            velocity.assign(velocity * ratio)

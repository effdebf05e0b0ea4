"""The stall watch: one warning per run when the training loss shows the network is not learning.

`StallWatch.check` looks at each device loop's summed loss (`train_loop.run_epoch`
calls it); with --stop_if_stalled the warning also stops the run (`Stalled`).
"""

from __future__ import annotations

import math

from alexnet_tf import recipes
from alexnet_tf.config import TrainConfig


class Stalled(RuntimeError):
    """The run stopped itself (--stop_if_stalled): its loss showed it was not learning."""


class StallWatch:
    """Says, once per run, when the training loss shows the network is not learning.

    Not learning: the loss of the latest device loop is non-finite, or, past
    `stall_steps` steps, still above (1 - stall_margin) x ln(classes), the loss
    of a network that predicts every class alike. The paper's initialisation
    is known to sit there (Caffe's bvlc_alexnet readme: biases of 1 "gave flat
    loss"), and a day of such a run on ImageNet is a day lost.

    Args:
      config: The run's config (stall_steps, stall_margin, stop_if_stalled, recipe).
      num_classes: The classes of the records.
      report: Called with the warning (the console and TensorBoard).
    """

    def __init__(self, config: TrainConfig, num_classes: int, report=None):
        self.config, self.report = config, report
        self.chance = recipes.chance_loss(num_classes)
        self.limit = (1 - config.stall_margin) * self.chance
        self.classes = num_classes
        self.warned = False

    def _advice(self) -> str:
        others = [r for r in recipes.RECIPES if r != self.config.recipe]
        if self.config.recipe == "paper":
            return ("The paper's initialisation (biases of 1, every weight N(0, 0.01)) is known to stall at this "
                    "loss: Caffe's bvlc_alexnet readme says biases of 1 'gave flat loss' and trained with "
                    "--recipe=caffe (biases 0.1, fc6/fc7 weights N(0, 0.005), biases at twice the learning "
                    "rate); --recipe=cuda_convnet2 is the paper's author's later one; a lower --learning_rate "
                    "may also help.")
        return (f"Check --learning_rate ({self.config.learning_rate:g}) and that the labels match the images; "
                f"the other recipes: {', '.join('--recipe=' + r for r in others)}.")

    def check(self, window_sums, global_step: int) -> str | None:
        """The warning for a device loop's summed (loss, top-1, top-5, count), once; else None."""
        if self.warned:
            return None
        loss, count = float(window_sums[0]), float(window_sums[3])
        if count <= 0:
            return None
        loss /= count
        if not math.isfinite(loss):
            message = (f"the training loss became {loss} by step {global_step}: the run diverged. The learning "
                       f"rate ({self.config.learning_rate:g}) is likely too high for this initialisation (on the "
                       "10-class sample the paper's blows up above 0.002): lower --learning_rate, add "
                       f"--warmup_epochs, or try another recipe. {self._advice()}")
        elif self.config.stall_steps and global_step >= self.config.stall_steps and loss > self.limit:
            message = (f"the training loss is {loss:.3f} after {global_step} steps, no better than chance "
                       f"(ln {self.classes} = {self.chance:.3f}; a network that learns is below {self.limit:.3f} "
                       f"by now): it is not learning. {self._advice()}")
        else:
            return None
        self.warned = True
        if self.config.stop_if_stalled:
            message += " Stopped (--stop_if_stalled); the checkpoints written so far are kept."
        if self.report:
            self.report(message, global_step)
        if self.config.stop_if_stalled:
            raise Stalled(message)
        return message

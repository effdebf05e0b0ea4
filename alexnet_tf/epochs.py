"""A run's epochs: each trained from its own pass of the stream, evaluated, reported and checkpointed.

`train_epochs` settles the stream's seed once for the run (the checkpoints
keep it, `settle_stream`), then trains epoch after epoch: a new, differently
seeded pass of the stream each epoch (read on from where a resumed epoch
stopped), the biases' learning rate set at its start, its progress bar, a
diverged run stopped at its end, then its validation, its summaries, the
schedule and a checkpoint.

The tf.data service's dispatcher is watched while the loop makes or reads
its datasets (TensorFlow would wait for a lost one for ever); checkpoint
writes are never cut short. An epoch's finished input iterator of this host's
own stream is let go on a thread of its own (`Releases`).
"""

from __future__ import annotations

import os
import sys
import threading
import typing

import tensorflow as tf

from alexnet_tf import (distribute, evaluation, input_pipeline, preprocessing, recipes, run_dir, service_client,
                        stall_watch, summaries as summaries_lib, train_loop)
from alexnet_tf.config import TrainConfig
from alexnet_tf.run_state import LoopState, Run

if typing.TYPE_CHECKING:
    from alexnet_tf.trainer import Data


def train_epochs(config: TrainConfig, data: Data, run: Run, recipe: recipes.Recipe, model, optimizer, strategy,
                 chief: bool, model_dir: str) -> list[dict]:
    """Trains the run's remaining epochs; returns the history of all its finished ones.

    Raises:
      train_loop.Diverged: The weights became non-finite.
      stall_watch.Stalled: The loss shows the network is not learning.
    """
    state = run.state
    stream_seed = settle_stream(config, state, run.resumed, run.workers, run.drawn)
    steps = _epoch_steps(config, data)
    profile_dir = _profile_dir(config, model_dir, chief)
    dataset_fn = _dataset_fn(config, data, state, stream_seed)
    if config.data_service:
        distribute.say(chief, f"input stream: the tf.data service at {config.data_service}, one job per epoch "
                              f"({service_job_name(state)} first); evaluation reads the records here")
    with strategy.scope():  # The biases' learning rate over the kernels', set at each epoch's start.
        bias_lr = tf.Variable(1.0, trainable=False, dtype=tf.float32)
    loop = train_loop.TrainLoop(
        model, optimizer, strategy, config.batch_size, config.weight_decay,
        finish=lambda inputs, labels: (preprocessing.finish_batch(*inputs, data.stats), labels),
        jit_compile=config.jit_compile, state=state, warmup_steps=config.warmup_epochs * data.steps_per_epoch,
        finite=bool(config.data_service), decay_biases=recipe.decay_biases,
        bias_lr=None if recipe.bias_lr is None else bias_lr)
    service = service_client.DispatcherWatch(config.data_service, config.data_service_timeout)
    evaluator = evaluation.Evaluator(model, strategy, data.records, data.stats,
                                     config.eval_batch_size or config.batch_size, per_class=config.figures)
    if int(state.epoch) >= config.epochs:
        distribute.say(chief, f"training already finished ({config.epochs} epochs)")
    with summaries_lib.Summaries(model_dir, chief, model, config, data) as summaries, Releases() as releases:
        watch = stall_watch.StallWatch(config, data.num_classes, summaries.warning)
        while int(state.epoch) < config.epochs:
            with service.watching():
                iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
            bias_lr.assign(recipe.bias_lr_in_epoch(int(state.epoch), config.epochs))
            with service.watching():
                result = train_loop.run_epoch(loop, iterator, state, config, steps, service.unwatched(run.save),
                                              profile_dir, watch, verbose=chief and config.verbose)
            if config.data_service:  # A service job's iterator talks to the dispatcher as it ends: kept here.
                distribute.say(chief, f"epoch {result['epoch']}: the service's epoch gave {result['steps']} steps, "
                                      f"{result['train_images']} of {data.records.meta.split('train').num_examples} "
                                      "training images (each service worker's last partial batch is dropped, a "
                                      "lost worker's shards skipped)")
            else:
                releases.drop([iterator])
                del iterator
            per_class = None
            if data.has_validation:
                val = evaluator.evaluate("validation")
                per_class = val.pop("per_class", None)
                result.update({f"val_{k}": v for k, v in val.items()})
            summaries.epoch(result["epoch"], result, per_class)
            recipes.next_epoch(config, state, optimizer, result, recipe, model.trainable_variables)
            run.end_epoch(result)
    return run.history


class Releases:
    """Lets go of finished input iterators on threads of their own; waits for them at the end of the block.

    TensorFlow's teardown of an iterator of an endless stream waits for a
    background thread of its pipeline: 4 to 7 s per epoch, measured on the
    sample on 2 cores, while the CPUs idle. The epoch's validation, summaries
    and checkpoint need not wait for it. `drop` takes a one-item list holding
    the iterator, so that the caller keeps no reference.
    """

    def __init__(self):
        self._threads: list[threading.Thread] = []

    def drop(self, holder: list) -> None:
        thread = threading.Thread(target=holder.clear, name="release-input-iterator", daemon=True)
        thread.start()
        self._threads.append(thread)

    def __enter__(self) -> Releases:
        return self

    def __exit__(self, *exc) -> None:
        for thread in self._threads:
            thread.join()


# ---------------------------------------------------------------------------
# The stream of the run's epochs.


def settle_stream(config: TrainConfig, state: LoopState, resumed: bool, workers: int, drawn: tuple[int, int]) -> int:
    """The training stream's seed, recorded in `state` with the run's identity,
    the batch size and the number of input pipelines (`workers`), after
    checking a resumed run keeps them.

    Without --seed the first start takes the chief's `drawn` seed and the
    checkpoints keep it, so a resumed epoch replays the same order. A run
    whose checkpoint has no identity yet takes the chief's drawn one.

    Raises:
      distribute.RunConflict: The checkpoint's run used another seed, batch size or
        number of workers: its input position would mean other records.
    """
    if resumed:
        for was, now, what in ((int(state.global_batch), config.batch_size, "--batch_size"),
                               (int(state.input_pipelines), workers, "workers (input pipelines)"),
                               (int(state.stream_seed), config.seed, "--seed")):
            if was >= 0 and now is not None and was != now:
                raise distribute.RunConflict(
                    f"the checkpoint's run has {what} {was}, this one {now}: a resumed run keeps them (the input "
                    f"position is counted in its records); use another --model_dir to start a new run")
    seed, run_id = int(state.stream_seed), int(state.run_id)
    seed = seed if seed >= 0 else drawn[0]
    state.stream_seed.assign(seed)
    state.run_id.assign(run_id if run_id >= 0 else drawn[1])
    state.global_batch.assign(config.batch_size)
    state.input_pipelines.assign(workers)
    return seed


def service_job_name(state: LoopState) -> str:
    """The tf.data service job of the run's current epoch."""
    return f"alexnet-{int(state.run_id):016x}-epoch{int(state.epoch) + 1}"


def _epoch_steps(config: TrainConfig, data: Data) -> int:
    """The steps of an epoch: sys.maxsize where the tf.data service's job ends it.

    The service's epoch ends when its job does: the trainers take batches from
    one job as they come, so one may get more than another, and a step where
    only some have a batch trains on those (the others' are empty). Capping
    the epoch at records // batch steps would drop the rest of the job.
    """
    return sys.maxsize if config.data_service and not config.steps_per_epoch else data.steps_per_epoch


def _profile_dir(config: TrainConfig, model_dir: str, chief: bool) -> str | None:
    """Where the profiler writes the traces of --profile_steps (the chief's), or None."""
    if config.profile_steps and chief:
        return run_dir.path(model_dir, os.path.join(run_dir.TENSORBOARD, "profile"))
    return None


def _dataset_fn(config: TrainConfig, data: Data, state: LoopState, stream_seed: int):
    """The training stream of the epoch `state` is in, for `distribute_datasets_from_function`."""

    def dataset_fn(context):
        seed, service = stream_seed + int(state.epoch) * 1000, config.data_service or None
        if service:
            # The epoch's job, shared by every trainer process; a resumed run reads
            # on from where the job is (the dispatcher keeps it for its
            # --job_gc_timeout), records already handed out are not produced again.
            job_name, skip = service_job_name(state), 0
        else:
            # Each input pipeline's own stream, from where this epoch's trained steps end.
            job_name, skip = None, int(state.step_in_epoch) * (config.batch_size // context.num_input_pipelines)
            seed += context.input_pipeline_id
        return input_pipeline.train_dataset(data.records, data.stats, config.batch_size, context,
                                            shuffle_buffer=config.shuffle_buffer, seed=seed, skip=skip,
                                            service=service, job_name=job_name)

    return dataset_fn

"""Tests of alexnet_tf/service_client.py: service addresses and the trainer's watch on its dispatcher."""

from __future__ import annotations

import time

import pytest
import tensorflow as tf

import cluster
from alexnet_tf import data_service, input_pipeline, service_client
from alexnet_tf.config import TrainConfig
from tfrecords.folder import Records


@pytest.mark.parametrize("given, expected", [("grpc://head:5050", ("head", 5050)), ("10.0.0.2:7", ("10.0.0.2", 7))])
def test_addresses(given, expected):
    assert service_client.address(given) == expected
    assert service_client.target(given) == f"grpc://{expected[0]}:{expected[1]}"


@pytest.mark.parametrize("bad, says", [("http://head:5050", "grpc:// only"), ("head", "not grpc://HOST:PORT"),
                                       ("head:port", "not grpc://HOST:PORT"), ("grpc://:5050", "not grpc://")])
def test_bad_addresses_are_named(bad, says):
    with pytest.raises(service_client.ServiceError, match=says):
        service_client.address(bad)



@pytest.mark.slow
def test_the_watch_ends_a_wait_for_a_lost_dispatcher_only(capfd):
    """A dispatcher back within the wait lets the run carry on; one gone for longer ends
    it, but never while a checkpoint is written, nor while the loop is not reading."""
    lost = []
    (port,) = cluster.free_ports(1)
    service = f"grpc://127.0.0.1:{port}"
    dispatcher = data_service.start_dispatcher(port=port)
    watch = service_client.DispatcherWatch(service, timeout_s=1.0, on_lost=lost.append)
    try:
        with watch.watching():
            assert service_client.dispatcher_answers(service)
            dispatcher.stop()
            time.sleep(0.6)
            dispatcher = data_service.start_dispatcher(port=port)  # Back within the wait.
            time.sleep(1.5)
            assert lost == []
            dispatcher.stop()
            watch.unwatched(time.sleep)(2.0)  # A checkpoint being written.
            assert lost == []
        time.sleep(2.0)  # Not reading from the service (evaluation): no wait to end.
        assert lost == []
        with watch.watching():
            deadline = time.monotonic() + 10
            while not lost and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        dispatcher.stop()
    assert lost == [f"the tf.data service dispatcher at {service} has not answered for 1 s (--data_service_timeout): "
                    "the run stops here, its checkpoints kept; start the dispatcher again (with the same --work_dir "
                    "it continues the epoch's job) and run this command again to resume"]
    err = capfd.readouterr().err
    assert f"train: the tf.data service dispatcher at {service} does not answer; waiting up to 1 s" in err
    assert f"train: the tf.data service dispatcher at {service} answers again (after" in err
    assert not service_client.dispatcher_answers(service)


def test_a_dispatcher_back_without_its_journal_is_named(built):
    """Restarted without --work_dir it forgot the job: the reader's error is recognised
    (train turns it into one line), and other NotFoundErrors are not."""
    out, meta = built
    (port,) = cluster.free_ports(1)
    service = f"grpc://127.0.0.1:{port}"
    dispatcher = data_service.start_dispatcher(port=port)
    worker = data_service.start_worker(f"127.0.0.1:{port}", port=0, host="localhost")
    epoch = input_pipeline.epoch_records(Records(out, meta), seed=2, shuffle_buffer=10).map(input_pipeline.record_fingerprint)
    error = None
    try:
        for i, _ in enumerate(input_pipeline.distribute_epoch(epoch.batch(1), service, "forgotten")):
            if i == 1:
                dispatcher.stop()
                dispatcher = data_service.start_dispatcher(port=port)  # No journal.
            time.sleep(0.05)
    except tf.errors.NotFoundError as e:
        error = e
    finally:
        worker.stop()
        dispatcher.stop()
    assert error is not None
    assert service_client.forgotten_job_message(error, service) == (
        f"the tf.data service dispatcher at {service} was restarted without a --work_dir journal and forgot this "
        "run's job: the run stops here, its checkpoints kept; run this command again to resume (the epoch's job "
        "starts over: its records already trained on come again), and start the dispatcher with --work_dir so that "
        "a restart continues its jobs")
    assert service_client.forgotten_job_message(tf.errors.NotFoundError(None, None, "no such file"), service) is None


def test_dispatcher_timeout_is_checked():
    with pytest.raises(ValueError, match="data_service_timeout must be 0 or more, got -1"):
        TrainConfig(data_service="grpc://head:5050", data_service_timeout=-1)
    assert not service_client.DispatcherWatch("grpc://head:5050", timeout_s=0).active  # 0: wait for ever.

"""The tf.data service on loopback: each record at most once per epoch, a lost worker,
training through the service (one trainer and two), and clear errors."""

from __future__ import annotations

import json
import os
import getpass
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf

import cluster
from alexnet_tf import data_service, input_pipeline, preprocessing
from alexnet_tf.config import TrainConfig
from tfrecords.folder import Records



def _cli(*argv, timeout=60):
    return subprocess.run([sys.executable, "-m", "alexnet_tf.data_service", *argv], cwd=cluster.REPO,
                          capture_output=True, text=True, timeout=timeout)


def _fingerprints(data_dir, meta) -> list[int]:
    files = Records(data_dir, meta).shard_paths("train")
    return [int(input_pipeline.record_fingerprint(s)) for s in tf.data.TFRecordDataset(files)]


def _read(dataset, out: list, each=None) -> None:
    for i, batch in enumerate(dataset):
        out.extend(batch.numpy().tolist())
        if each:
            each(i)


# -- addresses and errors --------------------------------------------------------


def test_cli_refuses_a_taken_port_and_a_missing_dispatcher(tmp_path):
    (nobody,) = cluster.free_ports(1)
    r = _cli("worker", "--bind=0.0.0.0", "--dispatcher", f"127.0.0.1:{nobody}")
    assert r.returncode == 1
    assert f"no tf.data service dispatcher at grpc://127.0.0.1:{nobody}" in r.stderr
    with data_service.LocalService(str(tmp_path), workers=0) as svc:  # A dispatcher holds the port.
        r = _cli("dispatcher", "--bind=0.0.0.0", "--port", str(svc.port))
        assert r.returncode == 1 and f"port {svc.port} is in use" in r.stderr
        r = _cli("worker", "--bind=0.0.0.0", "--dispatcher", f"127.0.0.1:{svc.port}", "--port", str(svc.port))
        assert r.returncode == 1 and f"port {svc.port} is in use" in r.stderr
    r = _cli("dispatcher", "--bind=0.0.0.0", "--port", "0", "--job_gc_timeout", "0")
    assert r.returncode == 1 and "must be positive" in r.stderr


@pytest.mark.parametrize("role", [["dispatcher"], ["worker", "--dispatcher", "127.0.0.1:1"]])
@pytest.mark.parametrize("bind", [[], ["--bind", "127.0.0.1"], ["--bind", "10.1.2.3"]])
def test_servers_start_only_when_told_to_listen_on_every_interface(role, bind):
    """TensorFlow listens on 0.0.0.0 whatever it is asked: by default (and for any one
    address) a server refuses to start, with one line saying why and what to do."""
    r = _cli(*role, "--port", "5999", *bind)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("data_service: error: --bind=")
    asked = bind[1] if bind else data_service.DEFAULT_BIND
    assert (f"--bind={asked}: TensorFlow's tf.data service cannot listen on one address, it always listens on every "
            f"interface (0.0.0.0 and ::), where anyone who can reach port 5999 can run any TensorFlow graph as user "
            f"{getpass.getuser()}") in r.stderr
    assert r.stderr.rstrip().endswith("start again with --bind=0.0.0.0")


def _other_address() -> str | None:
    """An address of this host other than loopback, or None."""
    for family, _, _, _, sockaddr in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
        if not sockaddr[0].startswith("127."):
            return sockaddr[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # No packet is sent: this only picks the outgoing interface.
        except OSError:
            return None
        mine = s.getsockname()[0]
    return None if mine.startswith("127.") or mine == "0.0.0.0" else mine


def test_the_start_up_line_says_who_can_reach_a_server(tmp_path):
    """With --bind=0.0.0.0 a server says, in one line, that anyone who reaches its port
    can run any graph as this user; and the line is true: it answers on another
    interface than loopback."""
    with data_service.LocalService(str(tmp_path), workers=0) as svc:
        lines = [line for line in open(svc.dispatcher.log) if line.startswith("data_service: ")]
        assert lines[0] == (f"data_service: dispatcher listening on 0.0.0.0 (every interface of {socket.gethostname()}, "
                            f"IPv4 and IPv6): anyone who can reach port {svc.port} on 0.0.0.0 can run any TensorFlow "
                            f"graph as user {getpass.getuser()}; keep it on a private network\n")
        other = _other_address()
        if other is None:
            pytest.skip("this host has no address besides loopback")
        socket.create_connection((other, svc.port), timeout=10).close()


@pytest.mark.parametrize("argv", [["--help"], ["dispatcher", "--help"], ["worker", "-h"]])
def test_help_exits_0(argv):
    r = _cli(*argv)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("usage: python -m alexnet_tf.data_service")


@pytest.mark.parametrize("argv, says", [
    ([], "give one role, dispatcher or worker"),
    (["dispatcher", "--port=abc"], "flag --port=abc: invalid literal for int() with base 10: 'abc'"),
    (["worker"], "a worker needs --dispatcher=HOST:PORT"),
    (["dispatcher", "--bogus"], "Unknown command line flag 'bogus'"),
    (["worker", "--dispatcher=head:5050", "--work_dir=/tmp/j"], "a worker does not take --work_dir (a dispatcher's "
                                                                "flags")])
def test_bad_command_lines_are_one_line_and_exit_1(argv, says):
    r = _cli(*argv)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"data_service: error: {says}") and r.stderr.endswith("see --help)\n")
    assert r.stderr.count("\n") == 1


def test_deterministic_runs_refuse_the_service():
    with pytest.raises(ValueError, match="deterministic cannot use data_service"):
        TrainConfig(seed=1, deterministic=True, data_service="grpc://head:5050")


def test_train_names_an_unreachable_dispatcher(built, tmp_path):
    out, _ = built
    (nobody,) = cluster.free_ports(1)
    r = subprocess.run([sys.executable, "-m", "alexnet_tf.train", "--preset=sample", f"--data_dir={out}",
                        f"--model_dir={tmp_path / 'run'}", f"--data_service=127.0.0.1:{nobody}"],
                       cwd=cluster.REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert f"train: error: no tf.data service dispatcher at grpc://127.0.0.1:{nobody}" in r.stderr
    assert not (tmp_path / "run").exists()  # Stopped before it wrote anything.


# -- a lost dispatcher -------------------------------------------------------------


def _start_training(out, model_dir, address, log, *flags):
    return subprocess.Popen(
        [sys.executable, "-m", "alexnet_tf.train", "--preset=sample", f"--data_dir={out}", f"--model_dir={model_dir}",
         "--epochs=1", "--batch_size=8", "--steps_per_loop=1", "--checkpoint_every_steps=2", "--log_images=0",
         "--nohistograms", "--nofigures", "--noexport", "--strategy=one_device", f"--data_service={address}", *flags],
        cwd=cluster.REPO, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_step(proc, log_path, step, deadline):
    # The service's epoch has no known length: "4/Unknown".
    while not re.search(rf"\b{step}/(\d+|Unknown)", open(log_path).read()):
        assert proc.poll() is None and time.monotonic() < deadline, open(log_path).read()[-3000:]
        time.sleep(0.2)


def _wait_for_line(proc, log_path, text, deadline):
    while text not in open(log_path).read():
        assert proc.poll() is None and time.monotonic() < deadline, open(log_path).read()[-3000:]
        time.sleep(0.2)


@pytest.mark.slow  # A dispatcher, a worker and a trainer compiling AlexNet: about a minute on 2 cores.
def test_training_ends_with_one_line_when_the_dispatcher_is_gone(built, tmp_path):
    out, meta = built
    model_dir = tmp_path / "run"
    log_path = tmp_path / "train.log"
    with data_service.LocalService(str(tmp_path), workers=1,
                                   dispatcher_flags=("--work_dir", str(tmp_path / "journal"))) as svc:
        with open(log_path, "w") as log:
            # Two epochs: a worker's buffered batches can finish the first without the dispatcher on a fast
            # machine; the second's job must come from the dispatcher.
            proc = _start_training(out, model_dir, svc.address, log, "--data_service_timeout=5", "--epochs=2")
        try:
            _wait_for_step(proc, log_path, 6, time.monotonic() + 300)
            svc.kill_dispatcher()
            killed = time.monotonic()
            ckpt_dir = str(model_dir / "checkpoints")
            code = proc.wait(120)  # TensorFlow alone would wait for ever.
        finally:
            proc.kill()
    waited = time.monotonic() - killed
    text = open(log_path).read()
    assert code == 1, text[-3000:]
    assert 5 <= waited < 60
    last = text.rstrip().split("\n")[-1]  # A line of its own, not after the progress bar's last update.
    assert last == (f"train: error: the tf.data service dispatcher at grpc://127.0.0.1:{svc.port} has not answered "
                    "for 5 s (--data_service_timeout): the run stops here, its checkpoints kept; start the dispatcher "
                    "again (with the same --work_dir it continues the epoch's job) and run this command again to "
                    "resume")
    assert "Traceback" not in text
    # The checkpoints written before are whole: the latest restores, at the step it was written.
    latest = tf.train.latest_checkpoint(ckpt_dir)
    assert latest and int(latest.rsplit("-", 1)[1]) >= 6
    step = dict(tf.train.list_variables(latest))
    assert step and int(tf.train.load_variable(latest, "global_step/.ATTRIBUTES/VARIABLE_VALUE")) == int(
        latest.rsplit("-", 1)[1])


@pytest.mark.slow  # A training run with its dispatcher killed and restarted: about a minute and a half on 2 cores.
def test_training_carries_on_when_the_dispatcher_is_back_within_the_wait(built, tmp_path):
    out, meta = built
    model_dir = tmp_path / "run"
    log_path = tmp_path / "train.log"
    journal = str(tmp_path / "journal")
    with data_service.LocalService(str(tmp_path), workers=1, dispatcher_flags=("--work_dir", journal)) as svc:
        with open(log_path, "w") as log:
            # Two epochs, and the restart only once the trainer has seen the dispatcher gone: on a fast machine
            # a worker's buffered batches finished the one epoch before the trainer missed the dispatcher.
            proc = _start_training(out, model_dir, svc.address, log, "--data_service_timeout=120", "--epochs=2")
        try:
            _wait_for_step(proc, log_path, 2, time.monotonic() + 300)
            svc.kill_dispatcher()
            _wait_for_line(proc, log_path, "does not answer; waiting up to", time.monotonic() + 120)
            svc.dispatcher = svc.start_dispatcher()  # The same --work_dir: its jobs go on.
            code = proc.wait(600)
        finally:
            proc.kill()
    text = open(log_path).read()
    assert code == 0, text[-3000:]
    assert f"the tf.data service dispatcher at grpc://127.0.0.1:{svc.port} answers again (after" in text
    _check_epochs(str(model_dir), meta, batch=8, replicas=1, epochs=2, complete=False)


# -- at most once ----------------------------------------------------------------


@pytest.fixture(scope="module")
def in_process_service():
    """A dispatcher and two workers in this process (quick to start)."""
    dispatcher = data_service.start_dispatcher(port=0)
    address = dispatcher.target.split("://")[1]
    workers = [data_service.start_worker(address, port=0, host="localhost") for _ in range(2)]
    yield dispatcher.target
    for w in workers:
        w.stop()
    dispatcher.stop()


def test_two_readers_of_one_epoch_job_get_every_record_exactly_once(built, in_process_service):
    out, meta = built
    assert len(Records(out, meta).shard_paths("train")) >= 2  # Something to share between the workers.
    epoch = input_pipeline.epoch_records(Records(out, meta), seed=7, shuffle_buffer=50).map(input_pipeline.record_fingerprint)
    readers = [[], []]
    threads = [threading.Thread(target=_read, args=(input_pipeline.distribute_epoch(epoch.batch(4),
                                                                                     in_process_service, "e1"), r))
               for r in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    everything = _fingerprints(out, meta)
    got = readers[0] + readers[1]
    assert len(set(everything)) == len(everything) == meta.split("train").num_examples
    assert sorted(got) == sorted(everything)  # Each once: nothing twice, nothing missed.
    assert readers[0] and readers[1]  # Both readers shared the job.
    again = []
    _read(input_pipeline.distribute_epoch(epoch.batch(4), in_process_service, "e1"), again)
    assert again == []  # A finished epoch's job gives nothing more.


def test_service_batches_are_training_batches(built, in_process_service):
    out, meta = built
    stats = preprocessing.ColorStats.from_records(Records(out, meta))
    ds = input_pipeline.train_dataset(Records(out, meta), stats, 8, seed=3, shuffle_buffer=50,
                                      service=in_process_service, job_name="batches")
    batches = list(ds)
    n = meta.split("train").num_examples
    # Each worker drops its own last partial batch: less than a batch per worker is lost.
    assert n - 2 * 7 <= 8 * len(batches) <= n
    (patches, aug), labels = batches[0]
    assert patches.shape == (8, 227, 227, 3) and patches.dtype == tf.uint8
    assert aug.alpha.shape == (8, 3) and set(labels.numpy()) <= set(range(meta.num_classes))
    # A record's crop comes from (seed, its fingerprint), not from the worker that made it.
    first = next(iter(tf.data.TFRecordDataset(Records(out, meta).shard_paths("train")[0])))
    image, _ = preprocessing.parse_record(first)
    seed = input_pipeline.record_seed(3, input_pipeline.record_fingerprint(first))
    a = preprocessing.crop_for_train(image, stats, seed=seed)[1]
    b = preprocessing.crop_for_train(image, stats, seed=seed)[1]
    assert int(a.top) == int(b.top) and int(a.left) == int(b.left)


@pytest.mark.slow  # Three service processes, one killed and restarted.
def test_a_killed_worker_loses_only_its_own_shards(built, tmp_path):
    """Killed mid-epoch and restarted at its address (as a supervisor would): the
    epoch goes on, and no record comes twice (the shards it held are skipped)."""
    out, meta = built
    epoch = input_pipeline.epoch_records(Records(out, meta), seed=1, shuffle_buffer=10).map(input_pipeline.record_fingerprint)
    got = []
    with data_service.LocalService(str(tmp_path), workers=2) as svc:
        def kill_then_restart(i):
            if i == 3:
                svc.kill_worker(0)
                svc.workers[0] = svc.start_worker(0)

        def slowly(i):
            time.sleep(0.05)
            kill_then_restart(i)

        _read(input_pipeline.distribute_epoch(epoch.batch(2), svc.address, "killed"), got, slowly)
    everything = _fingerprints(out, meta)
    assert len(got) == len(set(got))  # At most once.
    assert set(got) <= set(everything)
    assert len(got) >= 8  # It went on after the kill at the fourth batch.


# -- training through the service -----------------------------------------------


def _train(out, model_dir, address, *flags, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "alexnet_tf.train", "--preset=sample", f"--data_dir={out}", f"--model_dir={model_dir}",
         "--epochs=2", "--batch_size=16", "--steps_per_loop=2", "--log_images=0", "--nohistograms", "--noexport",
         f"--data_service={address}", *flags],
        cwd=cluster.REPO, capture_output=True, text=True, timeout=timeout)


def _check_epochs(model_dir, meta, batch=16, replicas=2, epochs=2, complete=True):
    with open(os.path.join(model_dir, "history.json")) as f:
        history = json.load(f)
    n = meta.split("train").num_examples
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    for h in history:
        # Whole replica batches; in a step where only some replicas still had one,
        # the others trained on an empty batch (as tf.distribute does).
        assert h["train_images"] % (batch // replicas) == 0
        assert (h["steps"] - 1) * batch // replicas < h["train_images"] <= h["steps"] * batch
        assert h["train_images"] <= n  # No record twice in an epoch.
        # The whole job, less each service worker's last partial batch (and, with
        # two replicas, a batch with no partner when the job ended).
        assert not complete or h["train_images"] >= n - 2 * (batch // replicas - 1) - (batch // replicas) * (replicas - 1)
        assert "val_top1_error" in h
    return history


@pytest.mark.slow  # A dispatcher, two workers and a trainer: about 50 s on 2 cores.
def test_training_through_two_service_workers(built, tmp_path):
    out, meta = built
    with data_service.LocalService(str(tmp_path), workers=2) as svc:
        r = _train(out, tmp_path / "run", svc.address, "--strategy=mirrored", "--cpu_devices=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "input stream: the tf.data service at" in r.stderr
    _check_epochs(str(tmp_path / "run"), meta)


@pytest.mark.slow  # A training run killed in the middle: about a minute and a half on 2 cores.
def test_training_goes_on_when_a_service_worker_is_killed(built, tmp_path):
    out, meta = built
    model_dir = tmp_path / "run"
    with data_service.LocalService(str(tmp_path), workers=2) as svc:
        log = open(tmp_path / "train.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "alexnet_tf.train", "--preset=sample", f"--data_dir={out}",
             f"--model_dir={model_dir}", "--epochs=2", "--batch_size=8", "--steps_per_loop=1", "--log_images=0",
             "--nohistograms", "--noexport", "--strategy=one_device", f"--data_service={svc.address}"],
            cwd=cluster.REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        # Four steps into epoch 1 (the service's epoch has no known length: "4/Unknown").
        while not re.search(r"\b4/(\d+|Unknown)", open(tmp_path / "train.log").read()):
            assert proc.poll() is None and time.monotonic() < deadline, open(tmp_path / "train.log").read()[-3000:]
            time.sleep(0.2)
        svc.kill_worker(1)
        time.sleep(3)
        svc.workers[1] = svc.start_worker(1)
        assert proc.wait(600) == 0, open(tmp_path / "train.log").read()[-3000:]
    _check_epochs(str(model_dir), meta, batch=8, replicas=1, complete=False)  # Its shards may be lost.


@pytest.mark.slow  # Two trainer processes compiling AlexNet: about two minutes on 2 cores.
def test_two_trainers_share_two_service_workers(built, tmp_path):
    out, meta = built
    with data_service.LocalService(str(tmp_path), workers=2) as svc:
        results = cluster.run_workers(lambda i: [
            "-m", "alexnet_tf.train", "--preset=sample", f"--data_dir={out}", f"--model_dir={tmp_path / 'run'}",
            "--epochs=2", "--batch_size=16", "--steps_per_loop=2", "--log_images=0", "--nohistograms", "--noexport",
            "--strategy=multi_worker", f"--data_service={svc.address}"])
    # One shared job per epoch: the two trainers' steps together cover the epoch once.
    _check_epochs(str(tmp_path / "run"), meta)
    assert "alexnet-" in results[0][1]

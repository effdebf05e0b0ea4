"""The trainer's side of the tf.data service: parsing its address, seeing that a dispatcher answers, and ending a run whose dispatcher is gone.

The servers and their command are `alexnet_tf.data_service`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import threading
import time

from toolcli import quiet

# How long a trainer waits for a dispatcher that stopped answering before it
# ends the run (--data_service_timeout): time for a supervisor to restart it.
DEFAULT_DISPATCHER_WAIT_S = 300.0


class ServiceError(Exception):
    """The service address is malformed or nothing listens there."""


def address(target: str) -> tuple[str, int]:
    """(host, port) of `grpc://host:port` or `host:port`.

    Raises:
      ServiceError: Another protocol, no port, or a port that is not a number.
    """
    rest = target
    if "://" in target:
        protocol, rest = target.split("://", 1)
        if protocol != "grpc":
            raise ServiceError(f"{target!r}: the tf.data service speaks grpc:// only")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ServiceError(f"{target!r} is not grpc://HOST:PORT")
    return host, int(port)


def target(service: str) -> str:
    """The `grpc://host:port` form of a service address."""
    host, port = address(service)
    return f"grpc://{host}:{port}"


def check_reachable(service: str, timeout: float = 10.0) -> None:
    """Raises `ServiceError` naming the address if no dispatcher accepts connections there.

    (tf.data's own client would retry for a long time before it says anything.)
    """
    host, port = address(service)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ServiceError(f"no tf.data service dispatcher at {target(service)} ({e.strerror or e}); start one "
                           "with `python -m alexnet_tf.data_service dispatcher`") from e


def dispatcher_answers(service: str, timeout: float = 5.0) -> bool:
    """Whether a tf.data service dispatcher at `service` answers a call within `timeout` seconds.

    A real call (the dispatcher's GetVersion), not only a connection: a
    dispatcher that is stopped or stuck accepts connections but answers nothing.
    """
    import grpc  # TensorFlow's own dependency.

    host, port = address(service)
    # A new channel each time: a channel that failed waits out its reconnect
    # back-off (up to minutes) before it tries a dispatcher that is back.
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            channel.unary_unary("/tensorflow.data.DispatcherService/GetVersion")(b"", timeout=timeout)
        except grpc.RpcError:
            return False
    return True


class DispatcherWatch:
    """Ends the process with one line when the trainer waits on a dispatcher that is gone.

    TensorFlow's tf.data client retries a dispatcher that does not answer for
    ever: a trainer whose dispatcher was killed would hang until something
    outside stopped it. While the watch is on (`watching`: the trainer is
    making or reading the service's datasets) a thread calls the dispatcher
    every few seconds. One that is back within `timeout_s` (restarted with the
    same --work_dir, it continues its jobs) lets the run carry on, with a line
    on stderr when it goes and when it is back. One that has not answered for
    `timeout_s` seconds ends the process: `on_lost(message)`, by default
    "<prog>: error: <message>" on stderr and exit status 1 (a thread cannot
    raise into a call that TensorFlow blocks in). Work that must not be cut
    short, a checkpoint being written, runs `unwatched`; the checkpoints
    written before stay as they are.

    Args:
      service: The dispatcher's grpc://HOST:PORT; empty: no service, the watch does nothing.
      timeout_s: Seconds to wait for the dispatcher (0: for ever, as TensorFlow does).
      prog: The command, for the lines it prints.
      on_lost: Called with the message instead of ending the process (tests).
    """

    def __init__(self, service: str, timeout_s: float = DEFAULT_DISPATCHER_WAIT_S, prog: str = "train",
                 on_lost=None):
        self.service, self.timeout_s, self.prog = service, timeout_s, prog
        self.on_lost = on_lost or self._exit
        self.every = min(5.0, max(0.2, timeout_s / 10))  # At least ten calls within the wait.
        self._on = False
        self._lock = threading.Lock()
        self._thread = None

    @property
    def active(self) -> bool:
        return bool(self.service) and self.timeout_s > 0

    def _say(self, message: str) -> None:
        # On a line of its own: the progress bar on stdout stops mid-line between its updates.
        print(file=sys.stdout, flush=True)
        print(f"{self.prog}: {message}", file=sys.stderr, flush=True)

    def _exit(self, message: str) -> None:
        quiet.drain()  # The console gets what the start-up filter still holds, and then this line, last.
        self._say(f"error: {message}")
        os._exit(1)

    def _set(self, on: bool) -> bool:
        with self._lock:  # Never while `_watch` is ending the process.
            was, self._on = self._on, on
        if on and self.active and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="dispatcher-watch", daemon=True)
            self._thread.start()
        return was

    @contextlib.contextmanager
    def watching(self):
        """The watch on within the block (as it was again after)."""
        was = self._set(True)
        try:
            yield self
        finally:
            self._set(was)

    def unwatched(self, fn):
        """`fn` with the watch off while it runs: never cut short."""
        @functools.wraps(fn)
        def unwatched(*args, **kwargs):
            was = self._set(False)
            try:
                return fn(*args, **kwargs)
            finally:
                self._set(was)
        return unwatched

    def _watch(self) -> None:
        where = target(self.service)
        waited = None  # Seconds waited (with the watch on) since the dispatcher last answered; None: it answers.
        last = None  # When it was last called with the watch on (None: the watch was off since).
        while True:
            time.sleep(self.every)
            if not self._on:
                last = None  # Time not spent reading from the service does not count.
                continue
            answers = dispatcher_answers(self.service, timeout=min(5.0, max(self.every, 1.0)))
            now = time.monotonic()
            if answers:
                if waited is not None:
                    self._say(f"the tf.data service dispatcher at {where} answers again (after {waited:.0f} s of "
                              "waiting); the run carries on")
                waited = None
            elif waited is None:
                waited = 0.0
                self._say(f"the tf.data service dispatcher at {where} does not answer; waiting up to "
                          f"{self.timeout_s:g} s for it (--data_service_timeout)")
            else:
                waited += now - last if last is not None else 0.0
                if waited >= self.timeout_s:
                    with self._lock:
                        if self._on:
                            self._on = False
                            self.on_lost(
                                f"the tf.data service dispatcher at {where} has not answered for {self.timeout_s:g} "
                                "s (--data_service_timeout): the run stops here, its checkpoints kept; start the "
                                "dispatcher again (with the same --work_dir it continues the epoch's job) and run "
                                "this command again to resume")
                            waited = None
            last = now


def forgotten_job_message(error: Exception, service: str) -> str | None:
    """The line for a trainer whose dispatcher came back without its journal, or None for any other error.

    A dispatcher restarted without --work_dir knows none of the jobs it had:
    TensorFlow's client then fails with NotFoundError ("Unknown iteration
    client id ... could be caused by a dispatcher restart").
    """
    import tensorflow as tf

    text = str(getattr(error, "message", error))
    if not isinstance(error, tf.errors.NotFoundError) or not (
            "Unknown iteration client id" in text or "caused by a dispatcher restart" in text):
        return None
    return (f"the tf.data service dispatcher at {target(service)} was restarted without a --work_dir journal and "
            "forgot this run's job: the run stops here, its checkpoints kept; run this command again to resume (the "
            "epoch's job starts over: its records already trained on come again), and start the dispatcher with "
            "--work_dir so that a restart continues its jobs")

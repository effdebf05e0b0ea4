r"""The tf.data service: the input stream's decoding and augmentation on other hosts.

    python -m alexnet_tf.data_service dispatcher --bind=0.0.0.0 --port=5050 --work_dir=/shared/dispatcher
    python -m alexnet_tf.data_service worker --bind=0.0.0.0 --dispatcher=head:5050 --port=5051  # each input host
    python -m alexnet_tf.train --data_service=grpc://head:5050 ...                             # any strategy

One dispatcher hands each epoch's training shards to the service workers as
they ask for them (`ShardingPolicy.DYNAMIC`); each worker reads, decodes and
crops its shards and sends batches to whichever trainer asks next. Every
trainer process of a run reads the same job, named after the run and the
epoch, so each training record is produced at most once per epoch however
many trainers and workers there are (`alexnet_tf.input_pipeline.service_train_dataset`).

A worker that dies loses the shards it was reading (their records are not
trained on that epoch: at most once, never twice); the trainers wait for it
to come back at the same address, so run workers under a supervisor that
restarts them (systemd, a Kubernetes Deployment) with a fixed `--port`. With
`--work_dir` the dispatcher writes a journal there and a restarted dispatcher
continues every job where it was; a trainer waits `--data_service_timeout`
seconds (default 300) for a dispatcher that stops answering, then ends with
one line and exit status 1, its checkpoints kept (`DispatcherWatch`). Workers read the records themselves: the
trainers' `--data_dir` must mean the same files on every worker (gs://, a
shared file system).

Who can reach it. The service has no authentication: whoever can open a
connection to a dispatcher's or a worker's port can register any dataset
graph, and the workers run it as the user who started them (a graph can read
and write files, e.g. `tf.io.read_file("/etc/hostname")`). TensorFlow's
servers cannot be bound to one interface: `DispatcherConfig` has no address,
`WorkerConfig.worker_address` is only the name the worker gives the
dispatcher, and the gRPC server always listens on 0.0.0.0 (every IPv4 and,
through gRPC's dual-stack socket, IPv6 interface; `GrpcDataServerBase::Start`
in tensorflow/core/data/service/server_lib.cc). So neither server starts
until the user says so with `--bind=0.0.0.0` (the default, 127.0.0.1, is
refused with a line saying why), and each prints one line at start-up saying
who can reach it. Keep the ports on a private network, or let only the
trainer and service hosts in, e.g. with 10.0.0.0/24 as those hosts:

    iptables  -A INPUT -p tcp --dport 5050:5051 -s 10.0.0.0/24 -j ACCEPT
    iptables  -A INPUT -p tcp --dport 5050:5051 -j DROP
    ip6tables -A INPUT -p tcp --dport 5050:5051 -j DROP    # after an ACCEPT for their IPv6 network, if any

(or a cloud firewall rule / security group that admits the same hosts).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import os
import socket
import subprocess
import sys
import threading
import time

DEFAULT_DISPATCHER_PORT = 5050
DEFAULT_WORKER_PORT = 5051
# A trainer restarted within this time continues its epoch's job; after it the
# dispatcher forgets the job and the resumed epoch starts a new one.
DEFAULT_JOB_GC_TIMEOUT_S = 3600
# How long the dispatcher waits for a worker's heartbeat before it counts it lost.
DEFAULT_WORKER_TIMEOUT_S = 60
HEARTBEAT_S = 5
# How long a trainer waits for a dispatcher that stopped answering before it
# ends the run (--data_service_timeout): time for a supervisor to restart it.
DEFAULT_DISPATCHER_WAIT_S = 300.0
# The one address TensorFlow's tf.data service servers listen on (server_lib.cc
# binds "0.0.0.0:<port>"; gRPC makes that every IPv4 and IPv6 interface).
EVERY_INTERFACE = "0.0.0.0"
# What --bind asks for unless told otherwise: loopback, which TensorFlow cannot
# honour, so a server only starts once its user has chosen to expose it.
DEFAULT_BIND = "127.0.0.1"


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


def check_bind(bind: str, port: int) -> None:
    """Raises `ServiceError` unless `bind` is the one address TensorFlow can listen on (`EVERY_INTERFACE`).

    TensorFlow cannot bind its tf.data servers to one interface: asked for
    loopback or one network's address, a server would listen on all of them
    instead, so it does not start.
    """
    if bind != EVERY_INTERFACE:
        which = f"port {port}" if port else "its port"
        raise ServiceError(
            f"--bind={bind}: TensorFlow's tf.data service cannot listen on one address, it always listens on every "
            f"interface ({EVERY_INTERFACE} and ::), where anyone who can reach {which} can run any TensorFlow graph "
            f"as user {getpass.getuser()}; firewall the port to your private network (python -m "
            f"alexnet_tf.data_service --help shows how) and start again with --bind={EVERY_INTERFACE}")


def exposure_line(role: str, port: int) -> str:
    """The start-up line of a server on `port`: who can reach it, and what that lets them do."""
    return (f"data_service: {role} listening on {EVERY_INTERFACE} (every interface of {socket.gethostname()}, "
            f"IPv4 and IPv6): anyone who can reach port {port} on {EVERY_INTERFACE} can run any TensorFlow graph "
            f"as user {getpass.getuser()}; keep it on a private network")


def check_port_free(port: int) -> None:
    """Raises `ServiceError` if something listens on `port` already.

    (gRPC servers bind with SO_REUSEPORT: a second dispatcher or worker on a
    taken port would start without a word and share the port's connections.)
    """
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
        # SO_REUSEADDR as the server itself: connections of a killed server still in
        # TIME_WAIT do not count, a listening socket does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise ServiceError(f"port {port} is in use ({e.strerror or e}); is a dispatcher or worker "
                               "already running there?") from e


def start_dispatcher(port: int = DEFAULT_DISPATCHER_PORT, work_dir: str | None = None,
                     job_gc_timeout_s: float = DEFAULT_JOB_GC_TIMEOUT_S,
                     worker_timeout_s: float = DEFAULT_WORKER_TIMEOUT_S):
    """A started `tf.data.experimental.service.DispatchServer` (fault tolerant with `work_dir`).

    It listens on every interface of this host (TensorFlow cannot bind one):
    anyone who can reach `port` can run any TensorFlow graph as this user.
    """
    import tensorflow as tf

    svc = tf.data.experimental.service
    return svc.DispatchServer(svc.DispatcherConfig(
        port=port, work_dir=work_dir, fault_tolerant_mode=bool(work_dir),
        job_gc_timeout_ms=int(job_gc_timeout_s * 1000), worker_timeout_ms=int(worker_timeout_s * 1000),
        # Lost workers and unused jobs are looked for this often.
        job_gc_check_interval_ms=int(min(job_gc_timeout_s, worker_timeout_s) * 1000 / 2)))


def start_worker(dispatcher: str, port: int = DEFAULT_WORKER_PORT, host: str | None = None):
    """A started `WorkerServer` registered with `dispatcher` (host:port), reachable at host:port.

    It listens on every interface of this host whatever `host` is (that is
    only the name it gives the dispatcher): anyone who can reach `port` can
    run any TensorFlow graph as this user.
    """
    import tensorflow as tf

    dhost, dport = address(dispatcher)
    svc = tf.data.experimental.service
    return svc.WorkerServer(svc.WorkerConfig(
        dispatcher_address=f"{dhost}:{dport}", port=port,
        worker_address=f"{host or socket.gethostname()}:%port%", heartbeat_interval_ms=HEARTBEAT_S * 1000))


def free_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1 now (for local servers and test clusters)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LocalService:
    """A service of local processes reached on 127.0.0.1: one dispatcher, `workers` workers.

    For trying the service on one host, tests and benchmarks. Like every
    tf.data service server they listen on every interface (`check_bind`):
    keep the host on a private network while they run. Each is a
    `python -m alexnet_tf.data_service` process on a free port; use as a
    context manager (every process is killed at the end). Logs go to files
    in `log_dir`, never to an unread pipe.
    """

    def __init__(self, log_dir: str, workers: int = 2, dispatcher_flags: tuple[str, ...] = ()):
        self.log_dir = log_dir
        ports = free_ports(workers + 1)
        self.port, self.worker_ports = ports[0], ports[1:]
        self.address = f"grpc://127.0.0.1:{self.port}"
        self.dispatcher_flags = dispatcher_flags
        self.dispatcher = self.start_dispatcher()
        self.workers = [self.start_worker(i) for i in range(workers)]

    def _start(self, name: str, *argv: str) -> subprocess.Popen:
        log = os.path.join(self.log_dir, f"{name}.log")
        started = self._started(log)
        with open(log, "a") as f:
            proc = subprocess.Popen([sys.executable, "-m", "alexnet_tf.data_service", *argv], cwd=_REPO,
                                    stdout=f, stderr=subprocess.STDOUT)
        proc.log = log
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # Each prints one line once it serves.
            if self._started(log) > started:
                return proc
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{open(log).read()[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not start:\n{open(log).read()[-2000:]}")

    @staticmethod
    def _started(log: str) -> int:
        if not os.path.exists(log):
            return 0
        with open(log) as f:
            return sum(line.startswith("data_service: ") for line in f)

    def start_dispatcher(self) -> subprocess.Popen:
        """Starts the dispatcher (again, after a kill: at the same port with the same flags, as a supervisor would)."""
        return self._start(f"dispatcher-{self.port}", "dispatcher", "--port", str(self.port),
                           f"--bind={EVERY_INTERFACE}", *self.dispatcher_flags)

    def kill_dispatcher(self) -> None:
        self.dispatcher.kill()
        self.dispatcher.wait()

    def start_worker(self, i: int) -> subprocess.Popen:
        """Starts worker i (again, after a kill: at the same port, as a supervisor would)."""
        port = self.worker_ports[i]
        return self._start(f"worker-{port}", "worker", "--dispatcher", f"127.0.0.1:{self.port}",
                           "--port", str(port), "--host", "127.0.0.1", f"--bind={EVERY_INTERFACE}")

    def kill_worker(self, i: int) -> None:
        self.workers[i].kill()
        self.workers[i].wait()

    def __enter__(self) -> "LocalService":
        return self

    def __exit__(self, *exc) -> None:
        for p in [*self.workers, self.dispatcher]:
            p.kill()
            p.wait()


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error line: one line on stderr and exit status 1 (argparse's
    own prints the usage too and exits 2); -h/--help still prints the help and exits 0."""

    def error(self, message: str):
        print(f"data_service: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(1)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m alexnet_tf.data_service", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    roles = p.add_subparsers(dest="role", required=True, metavar="{dispatcher,worker}")
    bind_help = (f"the address to listen on. TensorFlow's tf.data service can only listen on {EVERY_INTERFACE}, every "
                 "interface (IPv4 and IPv6), where anyone who can reach the port can run any TensorFlow graph as "
                 "this user: give --bind=0.0.0.0 once the port is on a private network or firewalled to the trainer "
                 f"and service hosts (`python -m alexnet_tf.data_service --help` shows how). Default {DEFAULT_BIND}, which it cannot honour: "
                 "the server does not start")
    d = roles.add_parser("dispatcher", help="the one dispatcher of a service")
    d.add_argument("--port", type=int, default=DEFAULT_DISPATCHER_PORT, help="port to listen on")
    d.add_argument("--bind", default=DEFAULT_BIND, metavar="ADDRESS", help=bind_help)
    d.add_argument("--work_dir", default=None,
                   help="journal folder: a restarted dispatcher continues its jobs (fault tolerant)")
    d.add_argument("--job_gc_timeout", type=float, default=DEFAULT_JOB_GC_TIMEOUT_S, metavar="SECONDS",
                   help="forget a job nobody has read for this long (a trainer restarted sooner continues "
                        "its epoch's job)")
    d.add_argument("--worker_timeout", type=float, default=DEFAULT_WORKER_TIMEOUT_S, metavar="SECONDS",
                   help="count a worker lost after this long without a heartbeat")
    w = roles.add_parser("worker", help="one worker (run one per input host)")
    w.add_argument("--dispatcher", required=True, metavar="HOST:PORT", help="the dispatcher's address")
    w.add_argument("--port", type=int, default=DEFAULT_WORKER_PORT,
                   help="port to listen on (fixed, so that a restarted worker is found at the same address)")
    w.add_argument("--bind", default=DEFAULT_BIND, metavar="ADDRESS", help=bind_help)
    w.add_argument("--host", default=None,
                   help=f"the name trainers reach this worker by (default: this host's name, {socket.gethostname()})")
    return p


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.role == "dispatcher":
            if args.job_gc_timeout <= 0 or args.worker_timeout <= 0:
                raise ServiceError("--job_gc_timeout and --worker_timeout must be positive")
            check_bind(args.bind, args.port)
            check_port_free(args.port)
            server = start_dispatcher(args.port, args.work_dir, args.job_gc_timeout, args.worker_timeout)
            port = server._server.bound_port()
            where = f"journal in {args.work_dir}" if args.work_dir else "no --work_dir: a restart forgets its jobs"
            print(exposure_line("dispatcher", port), flush=True)
            print(f"data_service: dispatcher at grpc://{socket.gethostname()}:{port} ({where})", flush=True)
        else:
            check_bind(args.bind, args.port)
            check_reachable(args.dispatcher)
            check_port_free(args.port)
            server = start_worker(args.dispatcher, args.port, args.host)
            port = server._server.bound_port()
            print(exposure_line("worker", port), flush=True)
            print(f"data_service: worker at {args.host or socket.gethostname()}:{port} for dispatcher "
                  f"{target(args.dispatcher)}", flush=True)
    except (ServiceError, ValueError) as e:
        print(f"data_service: error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # The servers' own start-up errors (a port in use, a bad work dir).
        if type(e).__module__.startswith("tensorflow"):
            print(f"data_service: error: {args.role} did not start: {getattr(e, 'message', e)}", file=sys.stderr)
            sys.exit(1)
        raise
    server.join()


if __name__ == "__main__":
    main()

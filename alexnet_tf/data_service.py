r"""The tf.data service: the input stream's decoding and augmentation on other hosts.

    python -m alexnet_tf.data_service dispatcher --bind=0.0.0.0 --port=5050 --work_dir=/shared/dispatcher
    python -m alexnet_tf.data_service worker --bind=0.0.0.0 --dispatcher=head:5050 --port=5051  # each input host
    python -m alexnet_tf.train --data_service=grpc://head:5050 ...                             # any strategy

One dispatcher hands each epoch's training shards to the service workers as
they ask for them (`ShardingPolicy.DYNAMIC`); each worker reads, decodes and
crops its shards and sends batches to whichever trainer asks next. Every
trainer process of a run reads the same job, named after the run and the
epoch, so each training record is produced at most once per epoch however
many trainers and workers there are (`alexnet_tf.input_pipeline.train_dataset` with `service`).

A worker that dies loses the shards it was reading (their records are not
trained on that epoch: at most once, never twice); the trainers wait for it
to come back at the same address, so run workers under a supervisor that
restarts them (systemd, a Kubernetes Deployment) with a fixed `--port`. With
`--work_dir` the dispatcher writes a journal there and a restarted dispatcher
continues every job where it was; a trainer waits `--data_service_timeout`
seconds (default 300) for a dispatcher that stops answering, then ends with
one line and exit status 1, its checkpoints kept (`service_client.DispatcherWatch`).
Workers read the records themselves: the trainers' `--data_dir` must mean the same files on every worker (gs://, a
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

import getpass
import os
import socket
import subprocess
import sys
import time

from absl import flags

from alexnet_tf.service_client import ServiceError, address, check_reachable, target
from toolcli.command import Command

DEFAULT_DISPATCHER_PORT = 5050
DEFAULT_WORKER_PORT = 5051
# A trainer restarted within this time continues its epoch's job; after it the
# dispatcher forgets the job and the resumed epoch starts a new one.
DEFAULT_JOB_GC_TIMEOUT_S = 3600
# How long the dispatcher waits for a worker's heartbeat before it counts it lost.
DEFAULT_WORKER_TIMEOUT_S = 60
HEARTBEAT_S = 5
# The one address TensorFlow's tf.data service servers listen on (server_lib.cc
# binds "0.0.0.0:<port>"; gRPC makes that every IPv4 and IPv6 interface).
EVERY_INTERFACE = "0.0.0.0"
# What --bind asks for unless told otherwise: loopback, which TensorFlow cannot
# honour, so a server only starts once its user has chosen to expose it.
DEFAULT_BIND = "127.0.0.1"


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


BIND_HELP = (f"The address to listen on. TensorFlow's tf.data service can only listen on {EVERY_INTERFACE}, every "
             "interface (IPv4 and IPv6), where anyone who can reach the port can run any TensorFlow graph as this "
             "user: give --bind=0.0.0.0 once the port is on a private network or firewalled to the trainer and "
             "service hosts (`python -m alexnet_tf.data_service --help` shows the iptables rules). Default " + DEFAULT_BIND + ", which it cannot "
             "honour: the server does not start.")
# Each role's own flags; --port and --bind are both roles'.
ROLE_FLAGS = {"dispatcher": ("work_dir", "job_gc_timeout", "worker_timeout"), "worker": ("dispatcher", "host")}


def define_flags() -> flags.FlagValues:
    """Both roles' flags, on a FlagValues of their own (`ROLE_FLAGS` says whose each is)."""
    fv = flags.FlagValues()
    flags.DEFINE_integer("port", None, f"Port to listen on (default: {DEFAULT_DISPATCHER_PORT} for the dispatcher, "
                         f"{DEFAULT_WORKER_PORT} for a worker; give a worker a fixed one, so that a restarted worker "
                         "is found at the same address).", flag_values=fv)
    flags.DEFINE_string("bind", DEFAULT_BIND, BIND_HELP, flag_values=fv)
    flags.DEFINE_string("work_dir", None, "dispatcher: journal folder: a restarted dispatcher continues its jobs "
                        "(fault tolerant).", flag_values=fv)
    flags.DEFINE_float("job_gc_timeout", DEFAULT_JOB_GC_TIMEOUT_S, "dispatcher: forget a job nobody has read for "
                       "this many seconds (a trainer restarted sooner continues its epoch's job).", flag_values=fv)
    flags.DEFINE_float("worker_timeout", DEFAULT_WORKER_TIMEOUT_S, "dispatcher: count a worker lost after this many "
                       "seconds without a heartbeat.", flag_values=fv)
    flags.DEFINE_string("dispatcher", None, "worker (required): the dispatcher's address, HOST:PORT.", flag_values=fv)
    flags.DEFINE_string("host", None, "worker: the name trainers reach this worker by (default: this host's name, "
                        f"{socket.gethostname()}).", flag_values=fv)
    return fv


COMMAND = Command("data_service", "python -m alexnet_tf.data_service {dispatcher,worker} [flags]", __doc__,
                  usage_status=1)


def _parse(argv):
    """The role and its flags' values; a command line that does not fit them ends with one line, exit status 1."""
    fv = define_flags()
    args, roles = COMMAND.parse(fv, argv, arguments=True)
    if len(roles) != 1 or roles[0] not in ROLE_FLAGS:
        given = f", got {' '.join(roles)}" if roles else ""
        COMMAND.fail(f"give one role, dispatcher or worker{given} (see --help)", 1)
    args.role = roles[0]
    other = next(r for r in ROLE_FLAGS if r != args.role)
    wrong = [f"--{name}" for name in ROLE_FLAGS[other] if fv[name].present]
    if wrong:
        COMMAND.fail(f"a {args.role} does not take {', '.join(wrong)} (a {other}'s flags; see --help)", 1)
    if args.role == "worker" and not args.dispatcher:
        COMMAND.fail("a worker needs --dispatcher=HOST:PORT (see --help)", 1)
    if args.port is None:
        args.port = DEFAULT_DISPATCHER_PORT if args.role == "dispatcher" else DEFAULT_WORKER_PORT
    return args


def main(argv=None) -> None:
    args = _parse(argv)
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

"""An emulated cluster on one machine: W network namespaces joined by shaped links.

Every rank gets a network namespace of its own with one interface, ``eth0``, the end of a veth
pair whose other end is a port of a Linux bridge in a switch namespace. Both ends of every link
are shaped to the same rate with a token bucket (``tc tbf``), so each rank has a full-duplex
link of that rate into a non-blocking switch; optional one-way delay and random loss are added
with ``netem`` on the rank side. Processes started with :meth:`EmulatedCluster.launch` run one
per namespace with the environment torch.distributed's ``env://`` rendezvous and gloo need, so a
gloo job sees W hosts on a network of the set rate instead of loopback. See docs/cluster.md.

As a command::

    python bench/cluster.py --ranks 2 --rate 1gbit --measure-only
    python bench/cluster.py --ranks 4 --rate 500mbit --delay 5 --loss 2 --measure-only
    python bench/cluster.py --ranks 2 --rate 1gbit -- python bench/train_dlrm.py --quick

As a module::

    with EmulatedCluster(2, "1gbit") as cluster:
        print(cluster.measured_bit_s)
        cluster.launch([sys.executable, "train.py"])

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and the ``ip`` and ``tc`` programs of iproute2.
Only the standard library is imported, so the module loads anywhere (the privilege check runs
before anything is created).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import ipaddress
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings

# Every name this module gives a namespace starts with PREFIX, followed by the launcher's pid,
# its start time (clock ticks since boot, so a reused pid is told apart), a per-process
# sequence number, and the role: "dctc4242-1234567-0-r1", "dctc4242-1234567-0-sw".
PREFIX = "dctc"
_NAME = re.compile(rf"^{PREFIX}(\d+)-(\d+)-(\d+)-(r\d+|sw)$")
NETNS_DIR = "/run/netns"

# Linux capability bits (linux/capability.h).
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21

# tc's rate units (iproute2 get_rate; matched without regard to case like tc does): SI and
# IEC multiples of bits per second, and the "bps" family, which is bytes per second.
_RATE_UNITS = {
    "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
    "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9, "tbps": 8 * 10**12,
    "kibps": 8 * 2**10, "mibps": 8 * 2**20, "gibps": 8 * 2**30, "tibps": 8 * 2**40,
}
_RATE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)([a-z]+)")
# Below this a link moves under 1 kB/s: too slow for any rendezvous or for the measurement.
MIN_RATE_BIT_S = 8_000

# tbf queues at most this much time's worth of bytes per port (a switch port's buffer).
QUEUE_LATENCY_MS = 100
# The measured rate may differ from the set one by this fraction before a warning.
MEASURE_TOLERANCE = 0.15
# The measurement moves this many seconds' worth of bytes at the set rate, and stops at the cap.
MEASURE_SECONDS = 0.75
MEASURE_CAP_S = 3.0

# Port of the rendezvous store in rank 0's namespace. The namespace is new and private to the
# run, so nothing else listens there; every launch takes the next port so that a store of an
# earlier launch lingering in TIME_WAIT never matters.
FIRST_MASTER_PORT = 29500
# Seconds a command of ip or tc may take before it counts as hung.
_TOOL_TIMEOUT_S = 30
# Lines of a rank's stderr kept for the error message when it fails.
STDERR_TAIL_LINES = 20


class ClusterError(RuntimeError):
    """Something about the emulated cluster failed (creation, a command of ip or tc, cleanup)."""


class ClusterUnavailable(ClusterError):
    """The cluster cannot be created here (privileges or programs missing). Raised before
    anything is created."""


class RankFailed(ClusterError):
    """A rank exited with a non-zero status or was killed by a signal; the other ranks were
    terminated. ``rank``, ``returncode`` (negative: the signal's number, as subprocess reports
    it), ``stderr_tail`` (its last lines of stderr) and ``results`` (a :class:`RankResult` per
    rank) describe what happened."""

    def __init__(self, message, *, rank, returncode, stderr_tail, results):
        super().__init__(message)
        self.rank = rank
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.results = results


class LaunchTimeout(ClusterError):
    """The ranks did not all finish within the launch's timeout; all were terminated.
    ``running`` lists the ranks that were still running, ``results`` holds a
    :class:`RankResult` per rank."""

    def __init__(self, message, *, running, results):
        super().__init__(message)
        self.running = running
        self.results = results


class Terminated(SystemExit):
    """Raised in the launcher when it receives SIGTERM or SIGHUP inside an
    :class:`EmulatedCluster`, so that cleanup runs; uncaught it exits with status 128 + signal
    number, as the signal itself would have."""

    def __init__(self, signum):
        super().__init__(128 + signum)
        self.signum = signum


@dataclasses.dataclass
class RankResult:
    """How one rank ended: its exit status (negative: killed by that signal), its captured
    stdout (None unless ``capture_stdout``), and the last lines of its stderr."""

    rank: int
    returncode: int | None
    stdout: str | None
    stderr_tail: str


# ----------------------------------------------------------------------------------------
# Arguments


def parse_rate(text, name="rate"):
    """Bits per second of a rate written as tc writes it: a positive number and a unit, no
    space (``1gbit``, ``500mbit``, ``2.5gbit``, ``800kbit``, ``1mibit``, ``10mbps`` = 10
    megabytes per second). A bare number is refused, since tc and people disagree about its
    unit. Raises ValueError naming ``name`` for anything else, and for rates under 8kbit."""
    if not isinstance(text, str):
        raise TypeError(f"{name}: expected a string such as '1gbit', got {type(text).__name__}")
    match = _RATE.fullmatch(text.lower())
    unit = match and _RATE_UNITS.get(match.group(2))
    if not unit:
        raise ValueError(f"{name}: {text!r} is not a rate as tc writes it: a positive number "
                         f"and a unit, no space, e.g. 1gbit, 500mbit, 2.5gbit, 800kbit")
    bits = float(match.group(1)) * unit
    if bits == 0:
        raise ValueError(f"{name}: {text!r} is zero; a link needs a positive rate")
    if bits < MIN_RATE_BIT_S:
        raise ValueError(f"{name}: {text!r} is below the smallest rate supported, 8kbit")
    return int(round(bits))


_DELAY = re.compile(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(ms|us|s)?")
_DELAY_UNITS_MS = {None: 1.0, "ms": 1.0, "us": 1e-3, "s": 1e3}


def parse_delay_ms(text):
    """Milliseconds of a delay written as a number of ms (``5``, ``0.5``) or as tc writes it
    (``5ms``, ``500us``, ``1s``): the command lines' ``--delay``/``--link-delay``. The range
    is checked where the delay is used. Raises ValueError naming the delay otherwise."""
    match = _DELAY.fullmatch(str(text).strip().lower())
    if not match:
        raise ValueError(f"delay: {text!r} is not a delay: a number of milliseconds, or a "
                         f"number and a unit as tc writes it (5ms, 500us, 1s)")
    return float(match.group(1)) * _DELAY_UNITS_MS[match.group(2)]


def delay_argument(text):
    """``parse_delay_ms`` for argparse, whose message then names the option."""
    try:
        return parse_delay_ms(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None


def format_rate(bits):
    """A rate in bits per second as a short tc-style string (1000000000 -> '1gbit')."""
    for unit, scale in (("tbit", 10**12), ("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits:g}bit"


def _check_number(value, name, low, high, *, high_open):
    """``value`` as a float if it is a finite real number in [low, high] (or [low, high) with
    ``high_open``), else ValueError/TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < low or value > high or (high_open and value == high):
        bound = f"{high})" if high_open else f"{high}]"
        raise ValueError(f"{name}: {value!r} is outside [{low}, {bound}")
    return value


def _check_world(world):
    if isinstance(world, bool) or not isinstance(world, int):
        raise TypeError(f"world: expected an int, got {type(world).__name__}")
    # Addresses are .1 to .W of one /24.
    if not 1 <= world <= 250:
        raise ValueError(f"world: {world} ranks; the emulated cluster has 1 to 250")
    return world


# ----------------------------------------------------------------------------------------
# Privileges and programs


def _capabilities():
    """The effective capability set of this process, as an int (0 if unreadable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _tool(name):
    """Path of an iproute2 program; sbin folders are searched too, since an unprivileged PATH
    often lacks them."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/bin:/bin"
    return shutil.which(name, path=path)


_NO_NETEM = ("delay needs the kernel's netem qdisc (sch_netem, CONFIG_NET_SCH_NETEM), which "
             "this kernel does not have; run without --delay (delay_ms), or on a kernel with "
             "netem (loss alone works without it)")


def _kernel_has_netem():
    """False if the kernel's configuration says netem was left out, True if it is built in
    or a module, None if the configuration cannot be read (then adding it is the test)."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            config = f.read()
    except (OSError, EOFError):
        return None
    if re.search(r"^CONFIG_NET_SCH_NETEM=[ym]$", config, re.M):
        return True
    return False


def check_available(netem=False):
    """Raise :class:`ClusterUnavailable` saying what is missing unless this process may create
    network namespaces (CAP_SYS_ADMIN, for the namespaces and their mounts, and CAP_NET_ADMIN,
    for links, addresses and qdiscs; root has both) and ``ip`` and ``tc`` are installed; with
    ``netem``, also if the kernel's configuration (/proc/config.gz) shows no netem. Creates
    nothing."""
    caps = _capabilities()
    missing = [name for bit, name in ((_CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
                                      (_CAP_NET_ADMIN, "CAP_NET_ADMIN"))
               if not caps >> bit & 1]
    if missing:
        raise ClusterUnavailable(
            f"the emulated cluster needs root: {' and '.join(missing)} "
            f"(to create network namespaces, veth links, a bridge and tc qdiscs) "
            f"{'is' if len(missing) == 1 else 'are'} missing for this process "
            f"(uid {os.geteuid()}); run it as root, e.g. with sudo")
    absent = [tool for tool in ("ip", "tc") if _tool(tool) is None]
    if absent:
        raise ClusterUnavailable(
            f"the emulated cluster needs the iproute2 programs ip and tc; not found: "
            f"{', '.join(absent)} (install iproute2)")
    if netem and _kernel_has_netem() is False:
        raise ClusterUnavailable(_NO_NETEM)


def unavailable_reason(netem=False) -> str | None:
    """Why this process cannot run the emulated cluster (``check_available``'s message), or
    None when it can: for a caller that skips rather than fails."""
    try:
        check_available(netem=netem)
    except ClusterUnavailable as exc:
        return str(exc)
    return None


# ----------------------------------------------------------------------------------------
# ip and tc


def _run(argv, *, check=True):
    """Run an ip/tc command; ClusterError with its stderr when it fails or hangs."""
    argv = [_tool(argv[0]) or argv[0]] + list(argv[1:])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{' '.join(argv)}: no answer in {_TOOL_TIMEOUT_S} s") from None
    if check and done.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{done.stderr.strip()}")
    return done


def list_namespaces():
    """Names of the named network namespaces (those under /run/netns)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _netns_exec(name, argv):
    """``argv`` prefixed so that it runs in namespace ``name``."""
    return [_tool("ip") or "ip", "netns", "exec", name, *argv]


def _namespace_pids(name):
    done = _run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


NAMESPACE_KILL_S = 5.0  # how long _delete_namespace keeps killing what a namespace holds


def _delete_namespace(name):
    """Kill every process left in namespace ``name`` and delete it. A namespace lives on while
    a process is inside it, so its processes go first; its veth ends go with it (deleting one
    end of a veth pair deletes the other). Listed and killed again until none is left (for up
    to NAMESPACE_KILL_S): a process forked between a listing and the kills would otherwise
    outlive the namespace's name, unseen, holding its links."""
    deadline = time.monotonic() + NAMESPACE_KILL_S
    while True:
        pids = _namespace_pids(name)
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    if os.path.exists(os.path.join(NETNS_DIR, name)):
        _run(["ip", "netns", "delete", name])


# ----------------------------------------------------------------------------------------
# Run names and leftovers


def _start_ticks(pid):
    """Start time of process ``pid`` in clock ticks since boot, or None if there is no such
    process or it has exited (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may contain anything:
    # state first, start time 20th.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


_sequence = 0
_sequence_lock = threading.Lock()


def _new_run_tag():
    """A name prefix no other run can have: pid, start time and sequence number."""
    global _sequence
    with _sequence_lock:
        n, _sequence = _sequence, _sequence + 1
    return f"{PREFIX}{os.getpid()}-{_start_ticks(os.getpid())}-{n}"


def cleanup_stale():
    """Delete the namespaces of earlier runs whose launcher is gone (its pid is dead or now
    belongs to a process started at another time), with the processes still inside them.
    Returns the names deleted. Namespaces of live launchers are left alone. Runs at the start of
    every cluster; needs the same privileges."""
    removed = []
    for name in list_namespaces():
        match = _NAME.match(name)
        if not match:
            continue
        pid, ticks = int(match.group(1)), int(match.group(2))
        if _start_ticks(pid) == ticks:
            continue
        try:
            _delete_namespace(name)
            removed.append(name)
        except ClusterError as exc:
            warnings.warn(f"could not delete the leftover namespace {name}: {exc}")
    return removed


# ----------------------------------------------------------------------------------------
# Addresses


def _host_networks():
    """IPv4 networks the host's own namespace uses (addresses and routes of every table)."""
    nets = []
    for argv in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        for line in _run(argv, check=False).stdout.splitlines():
            for word in line.split():
                try:
                    nets.append(ipaddress.ip_network(word, strict=False))
                except ValueError:
                    continue
    # "default" routes are not parsed above; 0.0.0.0/0 would overlap everything anyway.
    return [n for n in nets if n.version == 4 and n.prefixlen > 0]


def _pick_subnet(seed):
    """A 10.x.y.0/24 that overlaps nothing of the host's, drawn from ``seed``. The namespaces
    are isolated from the host, so an overlap would not break them; avoiding one keeps the
    addresses unambiguous for anyone reading routes or captures."""
    taken = _host_networks()
    rng = random.Random(seed)
    for _ in range(256):
        net = ipaddress.ip_network(f"10.{rng.randrange(1, 255)}.{rng.randrange(0, 256)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise ClusterError("no free 10.x.y.0/24 found for the emulated cluster")


# ----------------------------------------------------------------------------------------
# Measurement: a bulk TCP transfer between two namespaces, in child interpreters.

_RECEIVER = r"""
import json, socket, sys, time
addr, cap = sys.argv[1], float(sys.argv[2])
server = socket.socket()
server.bind((addr, 0))
server.listen(1)
print(server.getsockname()[1], flush=True)
server.settimeout(cap + 10)
conn, _ = server.accept()
deadline = time.monotonic() + cap
buf = bytearray(1 << 20)
first = last = None
count = 0
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        break
    conn.settimeout(left)
    try:
        n = conn.recv_into(buf)
    except socket.timeout:
        break
    if n == 0:
        break
    now = time.monotonic()
    # The first read only starts the clock: its bytes arrived before it.
    if first is None:
        first = now
    else:
        count += n
        last = now
print(json.dumps({"bytes": count, "seconds": (last - first) if last else 0.0}), flush=True)
"""

_SENDER = r"""
import socket, sys, time
addr, port, total, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
conn = socket.create_connection((addr, port), timeout=cap + 10)
deadline = time.monotonic() + cap
chunk = b"\0" * min(1 << 16, max(1024, total // 64))
sent = 0
try:
    while sent < total and time.monotonic() < deadline:
        conn.sendall(chunk)
        sent += len(chunk)
    conn.shutdown(socket.SHUT_WR)
except OSError:
    pass  # the receiver stops reading at its own cap
"""


def _measure_tcp(src_ns, dst_ns, dst_addr, rate_bit_s):
    """Bits per second of a bulk TCP transfer from ``src_ns`` to ``dst_addr`` in ``dst_ns``:
    about MEASURE_SECONDS worth of bytes at the set rate (at least 64 KiB), timed at the
    receiver from its first read to its last, and cut off after MEASURE_CAP_S."""
    total = max(64 << 10, int(rate_bit_s / 8 * MEASURE_SECONDS))
    receiver = subprocess.Popen(
        _netns_exec(dst_ns, [sys.executable, "-c", _RECEIVER, dst_addr, str(MEASURE_CAP_S)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = receiver.stdout.readline().strip()
        if not port.isdigit():
            raise ClusterError(f"the measurement's receiver did not start: "
                               f"{receiver.stderr.read().strip()}")
        sender = subprocess.run(
            _netns_exec(src_ns, [sys.executable, "-c", _SENDER, dst_addr, port, str(total),
                                 str(MEASURE_CAP_S)]),
            capture_output=True, text=True, timeout=MEASURE_CAP_S + 20)
        out, err = receiver.communicate(timeout=MEASURE_CAP_S + 20)
    except subprocess.TimeoutExpired:
        raise ClusterError("the link measurement hung") from None
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    if sender.returncode != 0 or receiver.returncode != 0:
        raise ClusterError(f"the link measurement failed: {sender.stderr.strip()} "
                           f"{err.strip()}".strip())
    result = json.loads(out)
    if result["seconds"] <= 0:
        raise ClusterError("the link measurement moved too little data to time")
    return result["bytes"] * 8 / result["seconds"]


# ----------------------------------------------------------------------------------------
# Running ranks


class _Rank:
    """One rank's process: its pipes drained by threads (stdout forwarded with a "[rank i]"
    prefix or captured; the tail of stderr kept and forwarded), and a thread that waits for it
    and puts its rank on ``exits``, so that exits are seen in the order they happen."""

    def __init__(self, rank, argv, env, cwd, capture_stdout, exits):
        self.rank = rank
        self.tail = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.stdout = [] if capture_stdout else None
        # Its own session: a terminal's Ctrl-C reaches the launcher only, which forwards it,
        # and killing the group reaches whatever the rank started.
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.threads = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, False), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, True), daemon=True),
            threading.Thread(target=self._wait, args=(exits,), daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _drain(self, pipe, is_stderr):
        prefix = f"[rank {self.rank}] "
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            if is_stderr:
                self.tail.append(line.rstrip("\n"))
                _write(sys.stderr, prefix + line)
            elif self.stdout is not None:
                self.stdout.append(line)
            else:
                _write(sys.stdout, prefix + line)
        pipe.close()

    def _wait(self, exits):
        self.proc.wait()
        exits.put(self.rank)

    def signal(self, sig):
        """Send ``sig`` to the rank's process group (nothing if it is gone)."""
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def result(self):
        for t in self.threads[:2]:
            t.join(timeout=2)
        stdout = "".join(self.stdout) if self.stdout is not None else None
        return RankResult(self.rank, self.proc.returncode, stdout, "\n".join(self.tail))


def _write(stream, text):
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):
        pass  # a closed console must not stop the ranks


def _describe_status(returncode):
    if returncode is not None and returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


# ----------------------------------------------------------------------------------------
# The cluster


class EmulatedCluster:
    """W network namespaces, one per rank, linked through a bridge by links shaped to ``rate``.

    Topology: rank i's namespace holds ``eth0`` with address ``addresses[i]`` of a private
    ``subnet`` (a 10.x.y.0/24 the host does not use), the end of a veth pair whose other end,
    ``p<i>``, is a port of bridge ``br0`` in a switch namespace. Both ends of every pair are
    shaped by a token bucket (tc tbf) to ``rate``, so a rank sends and receives at most ``rate``
    each way and traffic from many ranks to one queues at that rank's switch port, as on a
    switch. ``delay_ms`` (one-way, per packet a rank sends) and ``loss_pct`` (random loss of the
    packets a rank sends) are added by netem below tbf on the rank side; with loss, the rank
    sends one packet per buffer (no segmentation offload) so that loss applies per packet. On a
    kernel without netem, loss alone (no delay) is made by a random dropper instead: tc's bpf
    classifier sends a random ``loss_pct`` of the rank's packets to a class whose queue holds
    nothing (``loss_method`` is then "bpf", else "netem"; None without loss).
    Loopback is up in every namespace. Names carry the launcher's pid and start time, so runs
    never collide.

    Entering the context (or :meth:`open`): checks privileges and programs, and for delay
    (or loss on a kernel whose netem state is unknown) the kernel's netem, before creating
    anything (:class:`ClusterUnavailable`; a kernel
    whose configuration is unreadable is found to lack netem only when it is added, and what
    was created is deleted before the exception propagates), deletes leftovers of dead launchers
    (:func:`cleanup_stale`), creates the namespaces, links and qdiscs, and, with ``measure``
    (needs W >= 2), times a bulk TCP transfer from rank 0 to rank 1 over the tbf-shaped link,
    before netem is added: ``measured_bit_s``; a warning is issued if it is more than 15% off
    ``rate_bit_s``. With netem, the same transfer is repeated with it in place:
    ``measured_netem_bit_s`` (TCP's throughput under that delay and loss, which may be far
    below the rate; no warning).

    Cleanup: leaving the context (or :meth:`close`) kills every process still inside the run's
    namespaces and deletes them, whether the block ended normally, by an exception, by Ctrl-C
    (KeyboardInterrupt) or by SIGTERM/SIGHUP, which the context turns into :class:`Terminated`
    (a SystemExit) while it is open, if the launcher runs in the main thread and had no handler
    of its own for them. Signals arriving during cleanup are held until it is done. A launcher
    killed with SIGKILL cannot clean up; the next cluster's :func:`cleanup_stale` does.

    Arguments are checked when the object is built: ValueError naming ``world`` (1 to 250),
    ``rate`` (see :func:`parse_rate`), ``delay_ms`` (0 to 60000) or ``loss_pct`` (0 to less
    than 100). Attributes after opening: ``namespaces`` (one per rank), ``switch_namespace``,
    ``subnet``, ``addresses`` (one per rank), ``rate_bit_s``, ``measured_bit_s`` and
    ``measured_netem_bit_s`` (None when not measured).
    """

    def __init__(self, world, rate, *, delay_ms=None, loss_pct=None, measure=True):
        self.world = _check_world(world)
        self.rate = rate
        self.rate_bit_s = parse_rate(rate, "rate")
        self.delay_ms = None if delay_ms is None else _check_number(
            delay_ms, "delay_ms", 0, 60_000, high_open=False)
        self.loss_pct = None if loss_pct is None else _check_number(
            loss_pct, "loss_pct", 0, 100, high_open=True)
        self.measure = bool(measure)
        self.measured_bit_s = None
        self.measured_netem_bit_s = None
        self.loss_method = None
        self.tag = None
        self.namespaces = []
        self.switch_namespace = None
        self.subnet = None
        self.addresses = []
        self._created = []
        self._launches = 0
        self._saved_handlers = {}
        self._scratch = None  # the ranks' inductor cache folder, made at the first launch

    # -- context ------------------------------------------------------------------------

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._close(propagating=exc_type is not None)
        return False

    def open(self):
        """Create the cluster (see the class's docstring); on any failure, what was created is
        deleted before the exception propagates."""
        if self.tag is not None:
            raise ClusterError("this cluster was already opened")
        # Loss alone on a kernel without netem: a random packet dropper (see _add_rank).
        self.loss_method = None
        if self.loss_pct:
            self.loss_method = ("bpf" if not self.delay_ms and _kernel_has_netem() is False
                                else "netem")
        check_available(netem=bool(self.delay_ms) or self.loss_method == "netem")
        cleanup_stale()
        self.tag = _new_run_tag()
        self._install_signal_handlers()
        try:
            self._create()
            if self.measure and self.world >= 2:
                self._measure()
            self._add_netem()
        except BaseException:
            self._close(propagating=True)
            raise

    def close(self):
        """Kill what runs in the run's namespaces and delete them; SIGINT, SIGTERM and SIGHUP
        are held meanwhile and acted on afterwards. Safe to call more than once. Raises
        ClusterError if a namespace could not be deleted."""
        self._close(propagating=False)

    def _close(self, propagating):
        # While another exception propagates, a held signal or a failed deletion must not
        # replace it (a failed deletion is still reported, as a warning).
        held = []
        previous = self._hold_signals(held)
        try:
            errors = []
            for name in reversed(self._created):
                try:
                    _delete_namespace(name)
                except ClusterError as exc:
                    errors.append(str(exc))
            left = [n for n in self._created if n in list_namespaces()]
            self._created = [n for n in self._created if n in left]
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)
                self._scratch = None
        finally:
            self._restore_signals(previous)
            self._restore_signal_handlers()
        if left:
            message = f"namespaces not deleted: {', '.join(left)} ({'; '.join(errors)})"
            if propagating:
                warnings.warn(message, RuntimeWarning)
            else:
                raise ClusterError(message)
        if held and not propagating:
            self._raise_for_signal(held[0])
        elif held:
            # Another exception is on its way, but the signal was only held, not dropped:
            # delivered again now, with the handlers the caller had (by default, SIGTERM ends
            # the process and SIGINT raises KeyboardInterrupt over the exception).
            signal.raise_signal(held[0])

    # -- creation -------------------------------------------------------------------------

    def _add_namespace(self, name):
        # Listed before it exists, so a failure half-way still deletes it.
        self._created.append(name)
        _run(["ip", "netns", "add", name])
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _create(self):
        self.subnet = _pick_subnet(self.tag)
        hosts = list(self.subnet.hosts())
        self.addresses = [str(hosts[i]) for i in range(self.world)]
        self.switch_namespace = f"{self.tag}-sw"
        self._add_namespace(self.switch_namespace)
        sw = self.switch_namespace
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", "br0", "addrgenmode", "none"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        for rank in range(self.world):
            self._add_rank(rank)

    def _add_rank(self, rank):
        ns, sw, port = f"{self.tag}-r{rank}", self.switch_namespace, f"p{rank}"
        self.namespaces.append(ns)
        self._add_namespace(ns)
        # Both ends are created inside their namespaces: nothing appears on the host.
        _run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth",
              "peer", "name", port, "netns", sw])
        # No IPv6 link-local addresses: no neighbour discovery chatter on the shaped links.
        _run(["ip", "-n", ns, "link", "set", "eth0", "addrgenmode", "none"])
        _run(["ip", "-n", sw, "link", "set", port, "addrgenmode", "none"])
        _run(["ip", "-n", ns, "addr", "add", f"{self.addresses[rank]}/24", "dev", "eth0"])
        _run(["ip", "-n", sw, "link", "set", port, "master", "br0"])
        tbf = ["tbf", "rate", f"{self.rate_bit_s}bit", "burst", str(self._burst_bytes()),
               "latency", f"{QUEUE_LATENCY_MS}ms"]
        _run(["tc", "-n", sw, "qdisc", "add", "dev", port, "root", "handle", "1:", *tbf])
        if self.loss_method != "bpf":
            _run(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", *tbf])
        else:
            # A kernel without netem can still lose packets at random: an htb root whose
            # class 1:10 holds the rank's tbf and whose class 1:20 holds a fifo of no room
            # (every packet put there is dropped); the classifier (added after the
            # measurement) sends a random loss_pct of the packets to 1:20. htb's own rate is
            # far above the link's, so tbf alone shapes.
            _run(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "handle", "1:",
                  "htb", "default", "10"])
            for classid, parent in (("1:1", "1:"), ("1:10", "1:1"), ("1:20", "1:1")):
                _run(["tc", "-n", ns, "class", "add", "dev", "eth0", "parent", parent,
                      "classid", classid, "htb", "rate", f"{100 * self.rate_bit_s}bit",
                      "quantum", "60000"])
            _run(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "parent", "1:10", "handle",
                  "10:", *tbf])
            _run(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "parent", "1:20", "handle",
                  "20:", "pfifo", "limit", "0"])
        _run(["ip", "-n", sw, "link", "set", port, "up"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def _burst_bytes(self):
        """tbf's bucket: 1 ms at the rate, at least 16 KiB (a few full packets, and room for
        the timer's granularity at high rates), so little passes unshaped at low rates."""
        return max(16 << 10, int(self.rate_bit_s / 8 / 1000))

    def _random_drop_bytecode(self):
        """Classic BPF for tc's bpf classifier: class 1:20 (dropped) for a random loss_pct
        of the packets (the kernel's per-packet random number, SKF_AD_RANDOM, at or above
        (1 - loss_pct / 100) x 2^32), class 1:10 for the others."""
        threshold = min(2 ** 32 - 1, round((1 - self.loss_pct / 100) * 2 ** 32))
        load_random = 0xFFFFF000 + 56     # BPF_LD|BPF_W|BPF_ABS of SKF_AD_OFF + SKF_AD_RANDOM
        program = [(0x20, 0, 0, load_random), (0x35, 0, 1, threshold),  # jge threshold
                   (0x06, 0, 0, 0x10020), (0x06, 0, 0, 0x10010)]       # ret classid
        return ",".join([str(len(program))] + [" ".join(map(str, i)) for i in program])

    def _add_netem(self):
        """netem below each rank's tbf, for the delay and loss of the packets ranks send (or,
        for loss on a kernel without netem, the random dropper's classifier)."""
        if not self.delay_ms and not self.loss_pct:
            return
        if self.loss_method == "bpf":
            for ns in self.namespaces:
                _run(["ip", "-n", ns, "link", "set", "eth0", "gso_max_segs", "1"])
                _run(["tc", "-n", ns, "filter", "add", "dev", "eth0", "parent", "1:", "bpf",
                      "bytecode", self._random_drop_bytecode()])
            if self.measure and self.world >= 2:
                self.measured_netem_bit_s = _measure_tcp(
                    self.namespaces[0], self.namespaces[1], self.addresses[1],
                    self.rate_bit_s)
            return
        args = []
        if self.delay_ms:
            args += ["delay", f"{self.delay_ms:g}ms"]
        if self.loss_pct:
            args += ["loss", f"{self.loss_pct:g}%"]
        # netem replaces tbf's packet queue, so its limit (in packets) must hold what tbf
        # would have queued plus what is in flight during the delay, in full-size packets.
        seconds = (QUEUE_LATENCY_MS + (self.delay_ms or 0)) / 1000
        limit = max(1000, int(self.rate_bit_s / 8 * seconds / 1500) + 1)
        for ns in self.namespaces:
            if self.loss_pct:
                # netem drops whole buffers, and TCP hands over up to 64 KiB at once; one
                # packet per buffer makes loss_pct a loss rate of packets. It costs CPU per
                # packet, so it is set after the shaper was measured.
                _run(["ip", "-n", ns, "link", "set", "eth0", "gso_max_segs", "1"])
            try:
                _run(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "parent", "1:1",
                      "handle", "10:", "netem", *args, "limit", str(limit)])
            except ClusterError as exc:
                if "unknown" in str(exc).lower():
                    raise ClusterUnavailable(_NO_NETEM) from exc
                raise
        if self.measure and self.world >= 2:
            self.measured_netem_bit_s = _measure_tcp(
                self.namespaces[0], self.namespaces[1], self.addresses[1], self.rate_bit_s)

    def _measure(self):
        self.measured_bit_s = _measure_tcp(
            self.namespaces[0], self.namespaces[1], self.addresses[1], self.rate_bit_s)
        off = self.measured_bit_s / self.rate_bit_s - 1
        if abs(off) > MEASURE_TOLERANCE:
            warnings.warn(
                f"the emulated link measured {self.measured_bit_s / 1e6:.1f} Mbit/s, "
                f"{off:+.0%} off the set {format_rate(self.rate_bit_s)}; timings on it do not "
                f"show that rate (this machine may be too busy or too slow for it)",
                RuntimeWarning, stacklevel=3)

    # -- signals ------------------------------------------------------------------------

    def _install_signal_handlers(self):
        """SIGTERM and SIGHUP raise :class:`Terminated` while the cluster is open, so that
        close() runs; only from the main thread and only where no handler was set."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            raise Terminated(signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == signal.SIG_DFL:
                self._saved_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self):
        for sig, old in self._saved_handlers.items():
            signal.signal(sig, old)
        self._saved_handlers = {}

    @staticmethod
    def _hold_signals(held):
        """Record SIGINT/SIGTERM/SIGHUP in ``held`` instead of acting on them; returns the
        handlers to restore (none outside the main thread, where signals cannot be caught)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) != signal.SIG_IGN:
                previous[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
        return previous

    @staticmethod
    def _restore_signals(previous):
        for sig, old in previous.items():
            signal.signal(sig, old)

    @staticmethod
    def _raise_for_signal(signum):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    # -- running ranks --------------------------------------------------------------------

    def exec_argv(self, rank, argv):
        """``argv`` prefixed so that it runs in rank ``rank``'s namespace."""
        return _netns_exec(self.namespaces[rank], argv)

    def rank_env(self, rank, master_port, env=None):
        """The environment of rank ``rank``: this process's, updated with ``env``, then the
        cluster's variables, which win: RANK, WORLD_SIZE; each namespace is a node of one
        process, as torchrun would describe it, so LOCAL_RANK=0, LOCAL_WORLD_SIZE=1,
        GROUP_RANK=rank, GROUP_WORLD_SIZE=WORLD_SIZE; MASTER_ADDR (rank 0's address),
        MASTER_PORT; GLOO_SOCKET_IFNAME=eth0 (gloo would otherwise pick an interface by the
        host name, which resolves to nothing in the namespace). Unless one is given,
        TORCHINDUCTOR_CACHE_DIR is a folder of the cluster's own, removed when it closes: torch's
        DDP makes an (empty) inductor cache folder when first used, by default in /tmp, where
        it would outlive the run."""
        full = dict(os.environ)
        full.update(env or {})
        if "TORCHINDUCTOR_CACHE_DIR" not in full:
            if self._scratch is None:
                self._scratch = tempfile.mkdtemp(prefix="dct_kernels_inductor_")
            full["TORCHINDUCTOR_CACHE_DIR"] = self._scratch
        full.update({
            "RANK": str(rank), "WORLD_SIZE": str(self.world),
            "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "GROUP_RANK": str(rank), "GROUP_WORLD_SIZE": str(self.world),
            "MASTER_ADDR": self.addresses[0], "MASTER_PORT": str(master_port),
            "GLOO_SOCKET_IFNAME": "eth0",
        })
        return full

    def launch(self, argv, *, env=None, cwd=None, timeout=None, grace_s=5.0,
               capture_stdout=False):
        """Run ``argv`` once per rank, rank i in namespace i with :meth:`rank_env`'s
        environment, and return a :class:`RankResult` per rank when all have exited with
        status 0.

        Each rank's stderr (and stdout unless ``capture_stdout``) is copied to this process's,
        line by line, prefixed "[rank i] ". When a rank exits non-zero or is killed, the others
        get SIGTERM, ``grace_s`` seconds later SIGKILL, and :class:`RankFailed` is raised
        naming the first rank that failed, its status and its last lines of stderr. After
        ``timeout`` seconds (None: no limit) all are stopped the same way and
        :class:`LaunchTimeout` is raised. Ctrl-C (KeyboardInterrupt) or :class:`Terminated` in
        the launcher is passed on to the ranks as SIGINT or that signal, they are stopped the
        same way, and the exception propagates. Signals go to each rank's process group, so
        processes a rank started get them too.
        """
        check_launch_times(timeout, grace_s)
        if not self.namespaces or not self._created:
            raise ClusterError("the cluster is not open")
        port = FIRST_MASTER_PORT + self._launches
        self._launches += 1
        exits = queue.Queue()
        ranks = []
        try:
            # A signal while the ranks start is held until every started rank is on the list,
            # so that none of them escapes the stop below (a rank started but not yet listed
            # would outlive the launcher, and its output threads would keep it waiting).
            held = []
            previous = self._hold_signals(held)
            try:
                for rank in range(self.world):
                    ranks.append(_Rank(rank, self.exec_argv(rank, argv),
                                       self.rank_env(rank, port, env), cwd, capture_stdout,
                                       exits))
            finally:
                self._restore_signals(previous)
            if held:
                self._raise_for_signal(held[0])
            failed = self._wait_all(ranks, exits, timeout)
        except BaseException as exc:
            sig = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else getattr(
                exc, "signum", signal.SIGTERM)
            self._stop(ranks, exits, sig, grace_s)
            raise
        if failed is None:
            return [r.result() for r in ranks]
        if failed == "timeout":
            running = [r.rank for r in ranks if r.proc.poll() is None]
            self._stop(ranks, exits, signal.SIGTERM, grace_s)
            results = [r.result() for r in ranks]
            raise LaunchTimeout(
                f"ranks {', '.join(map(str, running))} of {self.world} still running after "
                f"{timeout:g} s; all ranks were stopped", running=running, results=results)
        self._stop(ranks, exits, signal.SIGTERM, grace_s)
        results = [r.result() for r in ranks]
        bad = results[failed]
        others = [f"rank {r.rank}: {_describe_status(r.returncode)}"
                  for r in results if r.rank != failed]
        message = (f"rank {failed} of {self.world} failed: {_describe_status(bad.returncode)}; "
                   f"the other ranks were stopped ({'; '.join(others) or 'none'})")
        if bad.stderr_tail:
            message += f"\n--- last lines of rank {failed}'s stderr ---\n{bad.stderr_tail}"
        raise RankFailed(message, rank=failed, returncode=bad.returncode,
                         stderr_tail=bad.stderr_tail, results=results)

    @staticmethod
    def _wait_all(ranks, exits, timeout):
        """None when every rank exited with 0; the first rank to exit otherwise, in the order
        of their exits; "timeout" if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = 0
        while done < len(ranks):
            # Short waits keep the launcher responsive to signals.
            wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if wait <= 0:
                return "timeout"
            try:
                rank = exits.get(timeout=wait)
            except queue.Empty:
                continue
            done += 1
            if ranks[rank].proc.returncode != 0:
                return rank
        return None

    @staticmethod
    def _stop(ranks, exits, sig, grace_s):
        """Send ``sig`` to every rank still running, SIGKILL after ``grace_s`` seconds, and
        wait for all of them."""
        for r in ranks:
            if r.proc.poll() is None:
                r.signal(sig)
        deadline = time.monotonic() + grace_s
        for r in ranks:
            try:
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for r in ranks:
            # Also reaches processes the rank started and left behind in its group.
            r.signal(signal.SIGKILL)
            r.proc.wait()


# ----------------------------------------------------------------------------------------
# Command line


def _parser():
    p = argparse.ArgumentParser(
        description="Run a command once per rank on an emulated cluster: one network "
                    "namespace per rank, links shaped to RATE into a bridge (needs root).",
        usage="%(prog)s --ranks W --rate RATE [--delay MS] [--loss PCT] "
              "[--measure-only | -- CMD ARGS...]")
    p.add_argument("--ranks", type=int, required=True, help="number of ranks (namespaces)")
    p.add_argument("--rate", required=True,
                   help="link rate as tc writes it: 1gbit, 500mbit, 2.5gbit, 800kbit")
    p.add_argument("--delay", type=delay_argument, default=None, metavar="MS",
                   help="one-way delay added to every packet a rank sends, in ms (5 or 5ms; "
                        "500us)")
    p.add_argument("--loss", type=float, default=None, metavar="PCT",
                   help="random loss of the packets a rank sends, in percent")
    p.add_argument("--measure-only", action="store_true",
                   help="create the cluster, measure the link, print JSON, clean up")
    p.add_argument("--no-measure", action="store_true",
                   help="skip the measurement of the link")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop all ranks after S seconds")
    p.add_argument("--grace", type=float, default=5.0, metavar="S",
                   help="seconds between SIGTERM and SIGKILL when stopping ranks")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    return p


def check_launch_times(timeout, grace_s):
    """ValueError naming the argument unless ``timeout`` is None or a finite number of seconds
    above 0 and ``grace_s`` a finite one of at least 0 (NaN would never time out, 0 or less
    would stop the ranks at once)."""
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout: expected a finite number of seconds > 0, got {timeout!r}")
    if not (math.isfinite(grace_s) and grace_s >= 0):
        raise ValueError(f"grace_s: expected a finite number of seconds >= 0, got {grace_s!r}")


def _summary(cluster):
    return {
        "ranks": cluster.world, "rate": cluster.rate, "rate_bit_s": cluster.rate_bit_s,
        "delay_ms": cluster.delay_ms, "loss_pct": cluster.loss_pct,
        "subnet": str(cluster.subnet),
        "measured_bit_s": cluster.measured_bit_s,
        "measured_over_rate": (None if cluster.measured_bit_s is None
                               else round(cluster.measured_bit_s / cluster.rate_bit_s, 4)),
        "measured_netem_bit_s": cluster.measured_netem_bit_s,
        "loss_method": cluster.loss_method,
    }


def main(argv=None):
    """The command; returns its exit status: 0, a failed rank's exit code (128 + signal if it
    was killed), 124 on --timeout, 130/143 on SIGINT/SIGTERM, 1 if the cluster failed."""
    parser = _parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.measure_only == bool(command):
        parser.error("give either --measure-only or -- CMD ARGS...")
    try:
        check_launch_times(args.timeout, args.grace)
    except ValueError as exc:
        parser.error(str(exc).replace("timeout:", "--timeout:").replace("grace_s:", "--grace:"))
    # Ctrl-C stops the command even when it was started with SIGINT ignored (a background
    # job of a non-interactive shell inherits that, and Python then installs no handler).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cluster = EmulatedCluster(args.ranks, args.rate, delay_ms=args.delay,
                                  loss_pct=args.loss,
                                  measure=args.measure_only or not args.no_measure)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    try:
        with cluster:
            summary = _summary(cluster)
            if args.measure_only:
                print(json.dumps(summary), flush=True)
                return 0
            print(f"emulated cluster: {json.dumps(summary)}", file=sys.stderr, flush=True)
            cluster.launch(command, timeout=args.timeout, grace_s=args.grace)
            return 0
    except RankFailed as exc:
        print(f"cluster.py: {exc}", file=sys.stderr)
        return exc.returncode if exc.returncode > 0 else 128 - exc.returncode
    except LaunchTimeout as exc:
        print(f"cluster.py: {exc}", file=sys.stderr)
        return 124
    except ClusterError as exc:
        print(f"cluster.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cluster.py: interrupted; ranks stopped and namespaces deleted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"cluster.py: {signal.Signals(exc.signum).name}; ranks stopped and namespaces "
              f"deleted", file=sys.stderr)
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())

"""The emulated cluster of bench/cluster.py (docs/cluster.md): argument checks; the message and
exit status without privileges (run as an unprivileged user when the suite runs as root); and,
as root with ip and tc, a shaped link moving a known number of bytes in the expected time, a
gloo all_reduce across the namespaces, failing and killed ranks, a launcher stopped by SIGTERM
or SIGINT, and the cleanup of leftovers. Every cluster test checks that nothing of its run is
left in ``ip netns list``."""

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import cluster as emu  # bench/cluster.py (pyproject's pythonpath)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
CLUSTER_PY = os.path.join(BENCH, "cluster.py")



UNAVAILABLE = emu.unavailable_reason()
needs_cluster = pytest.mark.skipif(UNAVAILABLE is not None,
                                   reason=f"emulated cluster unavailable: {UNAVAILABLE}")
NOBODY = 65534


def _names_of_pid(pid):
    return [n for n in emu.list_namespaces() if n.startswith(f"{emu.PREFIX}{pid}-")]


def _assert_gone(cluster):
    left = set(emu.list_namespaces())
    assert not left & set(cluster.namespaces + [cluster.switch_namespace])


def _host_links():
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


# ------------------------------------------------------------------------------ arguments

@pytest.mark.parametrize("rate", ["fast", "-1gbit", "1 gbit", "", "0mbit", "1000", "1gbit "])
def test_bad_rate_names_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        emu.EmulatedCluster(2, rate)


@pytest.mark.parametrize("rate,bits", [("1gbit", 10**9), ("500mbit", 5 * 10**8),
                                       ("2.5gbit", 25 * 10**8), ("800kbit", 8 * 10**5),
                                       ("1mibit", 2**20), ("10mbps", 8 * 10**7),
                                       ("20Mbit", 2 * 10**7)])
def test_rates_as_tc_writes_them(rate, bits):
    assert emu.parse_rate(rate) == bits


@pytest.mark.parametrize("text,ms", [("5", 5.0), ("5ms", 5.0), ("0.5", 0.5), ("500us", 0.5),
                                     ("1s", 1000.0), ("2.5MS", 2.5), ("0", 0.0)])
def test_delays_in_ms_or_as_tc_writes_them(text, ms):
    assert emu.parse_delay_ms(text) == ms


@pytest.mark.parametrize("text", ["5 parsecs", "ms", "-1", "5m", "", "1e"])
def test_bad_delay_text_is_refused(text):
    with pytest.raises(ValueError, match="^delay: "):
        emu.parse_delay_ms(text)


@pytest.mark.parametrize("kwargs,name", [
    ({"delay_ms": -1}, "delay_ms"), ({"delay_ms": float("nan")}, "delay_ms"),
    ({"delay_ms": float("inf")}, "delay_ms"), ({"loss_pct": -0.5}, "loss_pct"),
    ({"loss_pct": 100}, "loss_pct"), ({"loss_pct": float("nan")}, "loss_pct"),
])
def test_bad_delay_and_loss(kwargs, name):
    with pytest.raises(ValueError, match=name):
        emu.EmulatedCluster(2, "1gbit", **kwargs)


@pytest.mark.parametrize("flag,value", [("--timeout", "nan"), ("--timeout", "0"),
                                        ("--timeout", "-1"), ("--grace", "-1"),
                                        ("--grace", "inf")])
def test_bad_launch_times_name_the_flag(flag, value):
    """Refused before any namespace is made (NaN would never time out, 0 or less would stop
    the ranks at once)."""
    done = subprocess.run([sys.executable, CLUSTER_PY, "--ranks", "2", "--rate", "1gbit",
                           flag, value, "--", "true"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and f"{flag}:" in done.stderr, done.stderr


def test_bad_world():
    for world in (0, 251):
        with pytest.raises(ValueError, match="world"):
            emu.EmulatedCluster(world, "1gbit")


# ------------------------------------------------------------------------ no privileges

def _unprivileged_prefix():
    """How to run bench/cluster.py without privileges: as nobody when this is root (with an
    interpreter nobody can run, and the script readable to nobody), as is otherwise; None if
    neither works."""
    if os.geteuid() != 0:
        return [], sys.executable
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
    for python in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if python and subprocess.run(prefix + [python, CLUSTER_PY, "--help"], cwd="/",
                                     capture_output=True).returncode == 0:
            return prefix, python
    return None


def test_unprivileged_stops_before_creating_anything():
    how = _unprivileged_prefix()
    if how is None:
        pytest.skip("no way to run bench/cluster.py unprivileged here (setpriv missing, or "
                    "user nobody cannot run the interpreter or read the checkout)")
    prefix, python = how
    proc = subprocess.Popen(prefix + [python, CLUSTER_PY, "--ranks", "2", "--rate", "1gbit",
                                      "--measure-only"],
                            cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "needs root" in err and "CAP_NET_ADMIN" in err, err
    assert out == ""
    # setpriv execs the interpreter, so the launcher's pid is the one in the names it would use.
    assert _names_of_pid(proc.pid) == []


# ------------------------------------------------------------------------------ clusters

_RECEIVER = r"""
import json, os, socket, time
server = socket.create_server((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
conn, _ = server.accept()
first, count = None, 0
while chunk := conn.recv(1 << 20):
    first = first or time.monotonic()
    count += len(chunk)
print(json.dumps({"bytes": count, "seconds": time.monotonic() - first}))
"""

_SENDER = r"""
import os, socket, sys, time
for _ in range(100):
    try:
        conn = socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
        break
    except ConnectionRefusedError:
        time.sleep(0.05)
conn.sendall(b"x" * int(sys.argv[1]))
conn.close()
"""

_BOTH = "import os, sys\nif os.environ['RANK'] == '0':\n{}\nelse:\n{}\n"


def _indent(code):
    return "\n".join("    " + line for line in code.strip().splitlines())


@needs_cluster
def test_shaped_link_moves_bytes_in_expected_time():
    rate, nbytes = "20mbit", 4_000_000
    links_before = _host_links()
    code = _BOTH.format(_indent(_RECEIVER), _indent(_SENDER))
    with emu.EmulatedCluster(2, rate) as cluster:
        assert cluster.measured_bit_s > 0
        results = cluster.launch([sys.executable, "-c", code, str(nbytes)], timeout=30,
                                 capture_stdout=True)
    report = json.loads(results[0].stdout)
    assert report["bytes"] == nbytes
    # tbf counts whole frames: a 1448-byte TCP segment (timestamps on) is a 1514-byte frame.
    expected = nbytes * 1514 / 1448 * 8 / emu.parse_rate(rate)
    assert 0.75 * expected <= report["seconds"] <= 1.25 * expected, (report, expected)
    _assert_gone(cluster)
    assert _host_links() == links_before


_GLOO = r"""
import json, os, subprocess, datetime
import torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
t = torch.full((1 << 20,), float(rank + 1))
dist.all_reduce(t)
sent = subprocess.run(["tc", "-s", "qdisc", "show", "dev", "eth0"], capture_output=True,
                      text=True).stdout.split("Sent ")[1].split()[0]
cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
print(json.dumps({"rank": rank, "world": dist.get_world_size(), "min": t.min().item(),
                  "max": t.max().item(), "sent": int(sent), "cache": cache,
                  "cache_is_dir": bool(cache) and os.path.isdir(cache)}))
dist.destroy_process_group()
"""


@needs_cluster
def test_gloo_all_reduce_across_namespaces(monkeypatch):
    # The suite gives this process an inductor cache folder; a user's shell does not.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with emu.EmulatedCluster(2, "1gbit", measure=False) as cluster:
        results = cluster.launch([sys.executable, "-c", _GLOO], timeout=60, capture_stdout=True,
                                 env={"OMP_NUM_THREADS": "1"})
    for result in results:
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["rank"] == result.rank and report["world"] == 2
        assert report["min"] == report["max"] == 3.0
        # The 4 MiB tensor went through the rank's shaped interface, not loopback.
        assert report["sent"] >= 2 << 20
        # torch's inductor cache folder is the cluster's own, gone with it (not /tmp's).
        assert report["cache_is_dir"], report
        assert os.path.basename(report["cache"]).startswith("dct_kernels_inductor_")
        assert not os.path.exists(report["cache"])
    _assert_gone(cluster)


_FAIL = r"""
import os, signal, sys, time
rank = int(os.environ["RANK"])
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the other ranks need SIGKILL
if rank == {bad}:
    time.sleep(0.3)
    sys.stderr.write("boom from rank %d\n" % rank)
    sys.stderr.flush()
    {how}
time.sleep(60)
"""


@needs_cluster
def test_failed_and_killed_ranks_stop_the_others():
    with emu.EmulatedCluster(3, "1gbit", measure=False) as cluster:
        start = time.monotonic()
        with pytest.raises(emu.RankFailed, match="rank 1 of 3 failed: exit code 3") as info:
            cluster.launch([sys.executable, "-c", _FAIL.format(bad=1, how="sys.exit(3)")],
                           grace_s=1)
        assert info.value.rank == 1 and info.value.returncode == 3
        assert "boom from rank 1" in info.value.stderr_tail and "boom" in str(info.value)
        assert [r.returncode for r in info.value.results] == [-signal.SIGKILL, 3,
                                                              -signal.SIGKILL]

        with pytest.raises(emu.RankFailed, match="rank 2 of 3 failed: killed by signal "
                                                 "SIGKILL") as info:
            cluster.launch([sys.executable, "-c", _FAIL.format(
                bad=2, how="os.kill(os.getpid(), signal.SIGKILL)")], grace_s=1)
        assert info.value.returncode == -signal.SIGKILL

        with pytest.raises(emu.LaunchTimeout, match="still running") as info:
            cluster.launch(["sleep", "30"], timeout=1, grace_s=1)
        assert info.value.running == [0, 1, 2]
        assert time.monotonic() - start < 20
        assert not any(emu._namespace_pids(ns) for ns in cluster.namespaces)
    _assert_gone(cluster)


@needs_cluster
@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_launcher_signal_stops_ranks_and_cleans_up(sig, status):
    proc = subprocess.Popen([sys.executable, CLUSTER_PY, "--ranks", "2", "--rate", "1gbit",
                             "--no-measure", "--grace", "1", "--", "sleep", "60"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        pids = []
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            names = [n for n in _names_of_pid(proc.pid) if not n.endswith("-sw")]
            pids = [p for n in names for p in emu._namespace_pids(n)]
        assert len(pids) == 2, "the ranks did not start"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, err
    assert _names_of_pid(proc.pid) == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")


SIGNAL_DURING_CLEANUP = """
import os, signal, sys
sys.path.insert(0, {bench!r})
import cluster
real, sent = cluster._delete_namespace, []
def deleting(name):  # the signal arrives while the namespaces are being deleted
    if not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.{sig})
    return real(name)
cluster._delete_namespace = deleting
try:
    with cluster.EmulatedCluster(2, "100mbit", measure=False) as c:
        print(" ".join(c.namespaces + [c.switch_namespace]), flush=True)
        raise RuntimeError("the block failed")
except RuntimeError:
    pass
print("carried on", flush=True)
"""


@needs_cluster
@pytest.mark.parametrize("sig,status", [("SIGTERM", -signal.SIGTERM), ("SIGINT", -signal.SIGINT)])
def test_a_signal_held_during_cleanup_is_not_dropped(sig, status):
    """A signal that arrives while close() deletes the namespaces after the block raised is
    held until they are gone, then delivered: SIGTERM ends the launcher, SIGINT raises
    KeyboardInterrupt; neither is dropped, and nothing is left."""
    done = subprocess.run([sys.executable, "-c",
                           SIGNAL_DURING_CLEANUP.format(bench=BENCH, sig=sig)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr
    assert "carried on" not in done.stdout
    if sig == "SIGINT":
        assert "KeyboardInterrupt" in done.stderr
    names = done.stdout.split()
    assert names and not set(names) & set(emu.list_namespaces())


@needs_cluster
def test_cleanup_stale_removes_dead_launchers_only():
    dead = subprocess.Popen(["true"])
    dead.wait()
    # A launcher killed but not yet reaped by its parent is gone too.
    zombie = subprocess.Popen(["sleep", "60"])
    zombie_ticks = emu._start_ticks(zombie.pid)
    zombie.kill()
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    stale = [f"{emu.PREFIX}{dead.pid}-1-0-sw", f"{emu.PREFIX}{zombie.pid}-{zombie_ticks}-0-r0"]
    mine = f"{emu.PREFIX}{os.getpid()}-{emu._start_ticks(os.getpid())}-999-sw"
    for name in stale + [mine]:
        subprocess.run(["ip", "netns", "add", name], check=True)
    inside = subprocess.Popen(["ip", "netns", "exec", stale[0], "sleep", "60"])
    try:
        time.sleep(0.2)
        removed = emu.cleanup_stale()
        assert set(stale) <= set(removed) and mine not in removed
        assert inside.wait(timeout=10) == -signal.SIGKILL
        left = emu.list_namespaces()
        assert not set(stale) & set(left) and mine in left
    finally:
        zombie.wait()
        for name in stale + [mine]:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        if inside.poll() is None:
            inside.kill()


@needs_cluster
def test_measure_only_command():
    out = subprocess.run([sys.executable, CLUSTER_PY, "--ranks", "2", "--rate", "100mbit",
                          "--measure-only"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["rate_bit_s"] == 10**8 and report["measured_bit_s"] > 0
    assert report["subnet"].startswith("10.") and report["subnet"].endswith(".0/24")


@needs_cluster
def test_loss_without_netem_drops_packets_at_random():
    """On a kernel without netem, loss alone is a random dropper (tc's bpf classifier into a
    queue of no room): the rank-side dropped count over a bulk transfer is the loss rate,
    within a binomial bound; TCP still delivers every byte."""
    if emu._kernel_has_netem() is not False:
        pytest.skip("this kernel has netem: loss goes through it")
    with emu.EmulatedCluster(2, "200mbit", loss_pct=5, measure=False) as cluster:
        assert cluster.loss_method == "bpf"
        # One bulk transfer (about half a second), all of it with the dropper in place.
        assert emu._measure_tcp(cluster.namespaces[0], cluster.namespaces[1],
                                cluster.addresses[1], cluster.rate_bit_s) > 0
        shown = subprocess.run(["tc", "-s", "-n", cluster.namespaces[0], "qdisc", "show",
                                "dev", "eth0"], capture_output=True, text=True).stdout
        sent = int(re.search(r"qdisc tbf 10:.*?Sent \d+ bytes (\d+) pkt", shown, re.S)[1])
        dropped = int(re.search(r"qdisc pfifo 20:.*?dropped (\d+)", shown, re.S)[1])
        n = sent + dropped
        # About 0.5 s at 200 Mbit/s: thousands of packets.
        assert n > 2000, shown
        rate = dropped / n
        bound = 5 * (0.05 * 0.95 / n) ** 0.5
        assert abs(rate - 0.05) < bound, (rate, n, shown)
    _assert_gone(cluster)


@needs_cluster
def test_delay_and_loss_use_netem_or_say_it_is_missing():
    before = set(emu.list_namespaces())
    cluster = emu.EmulatedCluster(2, "100mbit", delay_ms=5, loss_pct=1, measure=False)
    if emu._kernel_has_netem() is False:
        with pytest.raises(emu.ClusterUnavailable, match="netem"):
            cluster.open()
        assert set(emu.list_namespaces()) <= before
        return
    with cluster:
        shown = subprocess.run(["tc", "-n", cluster.namespaces[1], "qdisc", "show", "dev",
                                "eth0"], capture_output=True, text=True).stdout
        assert "tbf" in shown and "netem" in shown
        assert "delay 5ms" in shown and "loss 1%" in shown
    _assert_gone(cluster)

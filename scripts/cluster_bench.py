#!/usr/bin/env python3
"""Cluster bench: dtrain (and PyTorch + gloo) across network-namespace "hosts" joined by
shaped links. Run as root, from the repository (after `cargo build --release`):

    sudo scripts/cluster_bench.py train --rates 10gbit,1gbit --grad-compression none,bf16
    sudo scripts/cluster_bench.py train --hosts 2 --ranks-per-host 2 --modes ddp --rates 1gbit
    sudo scripts/cluster_bench.py collectives --rates 25gbit,10gbit,1gbit,none --bytes 36M

Topology: HOSTS network namespaces; with 2 hosts one veth pair joins them (as in issue 11's
measurements), with more each host has a veth to a bridge in a "switch" namespace. Every end
of every link is shaped with `tc qdisc ... root tbf rate R burst 4mb latency 50ms` (tbf:
netem is not available on these kernels), so each host has an R full-duplex link. Host h has
address 10.77.0.(h+1); rank 0 (on host 0) is the master.

`train` runs, per link rate, the one-process baseline (`--mode single`, once before and once
after the rate's rows, their mean being the baseline, because these VMs drift by ~10 % within
minutes) and each `--modes` entry with
RANKS_PER_HOST ranks per host, each rank pinned to its own core (round robin over the CPUs this
script may use), `--threads` compute threads, synthetic data, `--iters` iterations. Transport:
`tcp` with one rank per host, `auto` (shared memory within a host, TCP between hosts) with
several. Ranks in different namespaces share /dev/shm and the boot id, so each host's ranks get
their own DTRAIN_HOST_ID. When torch is importable (`--torch auto`, the default), the same runs
are repeated with scripts/torch_ddp.py over gloo (GLOO_SOCKET_IFNAME = the host's link).

`--grad-compression none,bf16` adds a row per compression to the ddp and allreduce modes
(dtrain's flag; PyTorch's bf16/fp16_compress_hook), `--ref-dtrain PATH` the same modes with
another dtrain build (e.g. main's, for a same-run before/after), `--repeat N` runs the whole
series N times and adds a table of medians.

It prints a table: ms per iteration (dtrain's `Average time` line: the mean of iterations
1..iters-1, the slowest rank), images/s of all ranks, scaling efficiency (one process's
ms/iteration / the mode's, at the same batch per rank), dtrain's exposed communication time
per iteration (rank 0's mean `comm_seconds` from --metrics: time spent waiting for
collectives), PyTorch's numbers, and the 1-minute load average when each row started.

`collectives` times one all-reduce size across the shaped link, one rank per host, with
transport's sweep example (f32 and bf16 rows; build it with `cargo build --release -p
transport --example sweep`) or, when that is missing, `dtrain bench`; it prints the time, the
bus bandwidth and the share of the link rate that was used. `--parallel-links 1,2,4` also
times the same all-reduce split over K independent TCP communicators (K sockets and threads
per pair: transport's parallel_links example), to see whether one connection is the limit.

Every namespace and process this script creates is removed on exit, also on Ctrl-C, SIGTERM
or an error (namespaces of an earlier run of this script that was killed with -9 are removed
at start). Nothing outside its namespaces is changed.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "dcb"  # namespace and interface names: dcb<pid>h<host>, dcb<pid>sw, dcb<pid>e<host>
SUBNET = "10.77.0"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def fail(msg):
    raise SystemExit(f"cluster_bench: error: {msg}")


def run(cmd, check=True):
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {out.stderr.strip()}")
    return out


# ---- cleanup ---------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def namespaces():
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def kill_namespace_processes(ns):
    """Processes still running inside one of our namespaces (started by this script)."""
    out = run(["ip", "netns", "pids", ns], check=False).stdout
    for pid in (int(p) for p in out.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_stale_namespaces():
    for ns in namespaces():
        m = re.fullmatch(PREFIX + r"(\d+)(h\d+|sw)", ns)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            log(f"removing namespace {ns} left by an earlier run (pid {m.group(1)} is gone)")
            kill_namespace_processes(ns)
            run(["ip", "netns", "del", ns], check=False)


class Processes:
    """Every process this script started, so that cleanup can end them."""

    def __init__(self):
        self.live = []

    def start(self, argv, env, out_path):
        with open(out_path, "w") as out:
            p = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg ends its children too
            )
        self.live.append(p)
        return p

    def stop(self, p):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=3)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in list(self.live):
            self.stop(p)


# ---- the cluster -----------------------------------------------------------------------


class Cluster:
    def __init__(self, hosts, mtu, sysctls):
        tag = f"{PREFIX}{os.getpid()}"
        self.hosts = hosts
        self.mtu = mtu
        self.sysctls = sysctls
        self.ns = [f"{tag}h{h}" for h in range(hosts)]
        self.switch = f"{tag}sw" if hosts > 2 else None
        self.ifname = [f"{tag}e{h}" for h in range(hosts)]  # each host's end of its link
        self.port = [f"{tag}p{h}" for h in range(hosts)]  # the switch's end (hosts > 2)
        self.ip = [f"{SUBNET}.{h + 1}" for h in range(hosts)]
        self.created = []

    def all_namespaces(self):
        return self.ns + ([self.switch] if self.switch else [])

    def create(self):
        for ns in self.all_namespaces():
            run(["ip", "netns", "add", ns])
            self.created.append(ns)
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        if self.switch is None:
            run(["ip", "link", "add", self.ifname[0], "netns", self.ns[0], "type", "veth",
                 "peer", "name", self.ifname[1], "netns", self.ns[1]])
        else:
            run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
            run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
            for h in range(self.hosts):
                run(["ip", "link", "add", self.ifname[h], "netns", self.ns[h], "type", "veth",
                     "peer", "name", self.port[h], "netns", self.switch])
                run(["ip", "-n", self.switch, "link", "set", self.port[h], "master", "br0"])
                run(["ip", "-n", self.switch, "link", "set", self.port[h], "mtu", str(self.mtu), "up"])
        for h in range(self.hosts):
            run(["ip", "-n", self.ns[h], "addr", "add", f"{self.ip[h]}/24", "dev", self.ifname[h]])
            run(["ip", "-n", self.ns[h], "link", "set", self.ifname[h], "mtu", str(self.mtu), "up"])
            for setting in self.sysctls:  # per network namespace: the host's own settings
                run(["ip", "netns", "exec", self.ns[h], "sysctl", "-q", "-w", setting])

    def link_ends(self):
        ends = [(self.ns[h], self.ifname[h]) for h in range(self.hosts)]
        if self.switch:
            ends += [(self.switch, self.port[h]) for h in range(self.hosts)]
        return ends

    def shape(self, rate):
        """tbf on every end of every link; rate `none` removes the shaping."""
        for ns, dev in self.link_ends():
            if rate == "none":
                run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
            else:
                run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                     "tbf", "rate", rate, "burst", "4mb", "latency", "50ms"])

    def destroy(self):
        for ns in self.created:
            kill_namespace_processes(ns)
        for ns in reversed(self.created):
            run(["ip", "netns", "del", ns], check=False)
        self.created = []


# ---- running ranks ---------------------------------------------------------------------


class Job:
    """One multi-rank run: a command per rank, each in its host's namespace, pinned."""

    def __init__(self, procs, workdir, name, deadline_s):
        self.procs, self.workdir, self.name, self.deadline_s = procs, workdir, name, deadline_s
        self.ranks = []  # (rank, host, Popen, output path)

    def add(self, rank, host, ns, core, argv, env):
        full_env = dict(os.environ)
        full_env.update(env)
        out = os.path.join(self.workdir, f"{self.name}-r{rank}.log")
        cmd = ["ip", "netns", "exec", ns, "taskset", "-c", str(core)] + argv
        self.ranks.append((rank, host, self.procs.start(cmd, full_env, out), out))

    def wait(self):
        """Waits for every rank (killing all at the deadline); returns [(rank, code, text)]."""
        end = time.monotonic() + self.deadline_s
        for _, _, p, _ in self.ranks:
            left = end - time.monotonic()
            try:
                p.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                break
        timed_out = any(p.poll() is None for _, _, p, _ in self.ranks)
        for _, _, p, _ in self.ranks:
            self.procs.stop(p)
        results = []
        for rank, _, p, out in self.ranks:
            with open(out, errors="replace") as f:
                text = f.read()
            if timed_out and p.returncode != 0:
                text += f"\n[cluster_bench: killed after the {self.deadline_s} s deadline]"
            results.append((rank, p.returncode, text))
        return results


AVG_RE = re.compile(r"Average time for (\d+) iterations: ([0-9.]+)s")
HASH_RE = re.compile(r"Parameter hash: (0x[0-9a-f]+)")


def tail(text, lines=15):
    return "\n".join(text.strip().splitlines()[-lines:])


def step_seconds(results, what):
    """The slowest rank's mean iteration time, or raise with the failing rank's output."""
    times = []
    for rank, code, text in results:
        m = AVG_RE.search(text)
        if code != 0 or m is None:
            raise RuntimeError(f"{what}: rank {rank} exited {code}:\n{tail(text)}")
        times.append(float(m.group(2)))
    return max(times)


def mean_metric(metrics_path, key):
    """Rank 0's mean `key` (comm_seconds, cpu_seconds) over iterations 1.. (0 is warm-up)."""
    try:
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except OSError:
        return None
    values = [r[key] for r in rows if key in r][1:]
    return sum(values) / len(values) if values else None


class Bench:
    def __init__(self, args, cluster, procs, workdir):
        self.args, self.cluster, self.procs, self.workdir = args, cluster, procs, workdir
        cpus = sorted(os.sched_getaffinity(0))
        self.cpus = cpus
        self.world = args.hosts * args.ranks_per_host
        if self.world > len(cpus):
            log(f"note: {self.world} ranks share {len(cpus)} CPUs (ranks are pinned round robin)")
        self.port = 29600
        self.runs = 0

    def next_port(self):
        self.port += 1
        return self.port

    def placement(self):
        """(global rank, host, core) for every rank: host-major, like dtrain's hierarchy."""
        m = self.args.ranks_per_host
        return [(h * m + l, h, self.cpus[(h * m + l) % len(self.cpus)])
                for h in range(self.args.hosts) for l in range(m)]

    def host_env(self, h):
        return {"DTRAIN_HOST_ID": f"{PREFIX}{os.getpid()}-host{h}"}

    def dtrain_common(self, world):
        a = self.args
        return [
            "--dataset", "synthetic",
            "--synthetic-train", str(a.batch_size * world * (a.iters + 1)),
            "--synthetic-test", str(32 * world),
            "--batch-size", str(a.batch_size),
            "--threads", str(a.threads),
            "--max-iters", str(a.iters),
            "--model", a.model,
            "--log-every", "1000000",
            "--no-progress",
        ] + a.dtrain_arg

    def job(self, name):
        self.runs += 1
        return Job(self.procs, self.workdir, f"{self.runs:03d}-{name}", self.args.run_timeout)

    def dtrain_single(self):
        """(seconds per iteration, CPU seconds per iteration) of one process."""
        job = self.job("dtrain-single")
        metrics = os.path.join(self.workdir, f"{job.name}.metrics.jsonl")
        argv = [self.args.dtrain, "--mode", "single", "--num-nodes", "1", "--metrics", metrics]
        job.add(0, 0, self.cluster.ns[0], self.cpus[0], argv + self.dtrain_common(1), self.host_env(0))
        return step_seconds(job.wait(), "dtrain --mode single"), mean_metric(metrics, "cpu_seconds")

    def dtrain_mode(self, mode, compression="none", exe=None):
        """One dtrain run; `exe` is another dtrain binary (--ref-dtrain) to run instead."""
        a = self.args
        transport = a.transport or ("tcp" if a.ranks_per_host == 1 else "auto")
        port = self.next_port()
        job = self.job(f"dtrain-{mode}-{compression}{'-ref' if exe else ''}")
        metrics = os.path.join(self.workdir, f"{job.name}.metrics.jsonl")
        for rank, h, core in self.placement():
            argv = [exe or a.dtrain, "--master-ip", self.cluster.ip[0], "--master-port", str(port),
                    "--num-nodes", str(self.world), "--rank", str(rank), "--mode", mode,
                    "--transport", transport] + self.dtrain_common(self.world)
            if compression != "none":
                argv += ["--grad-compression", compression]
            if rank == 0:
                argv += ["--metrics", metrics]
            job.add(rank, h, self.cluster.ns[h], core, argv, self.host_env(h))
        results = job.wait()
        secs = step_seconds(results, f"dtrain --mode {mode}")
        hashes = {HASH_RE.search(t).group(1) for _, _, t in results if HASH_RE.search(t)}
        if len(hashes) != 1:
            raise RuntimeError(f"dtrain --mode {mode}: ranks ended with different parameter hashes {hashes}")
        return secs, mean_metric(metrics, "comm_seconds"), mean_metric(metrics, "cpu_seconds")

    def torch_job(self, mode, world, compression="none"):
        a = self.args
        port = self.next_port()
        job = self.job(f"torch-{mode}-{compression}")
        script = os.path.join(REPO, "scripts", "torch_ddp.py")
        placement = self.placement() if world > 1 else [(0, 0, self.cpus[0])]
        for rank, h, core in placement:
            env = {"MASTER_ADDR": self.cluster.ip[0], "MASTER_PORT": str(port),
                   "RANK": str(rank), "WORLD_SIZE": str(world),
                   "GLOO_SOCKET_IFNAME": self.cluster.ifname[h]}
            argv = [sys.executable, script, "--mode", mode, "--iters", str(a.iters),
                    "--batch-size", str(a.batch_size), "--model", a.model, "--threads", str(a.threads),
                    "--grad-compression", compression]
            job.add(rank, h, self.cluster.ns[h], core, argv, env)
        return step_seconds(job.wait(), f"PyTorch --mode {mode}")


def torch_available():
    out = subprocess.run([sys.executable, "-c", "import torch"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    return out.returncode == 0


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def link_settings(args):
    return f", MTU {args.mtu}" + "".join(f", {s}" for s in args.sysctl)


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def train(args, cluster, procs, workdir):
    named_vgg = args.model.upper() in ("VGG11", "VGG13", "VGG16", "VGG19")  # what torch_ddp.py builds
    if args.torch == "on" and not named_vgg:
        fail(f"--torch on needs --model vgg11, vgg13, vgg16 or vgg19 (torch_ddp.py has no {args.model!r})")
    if args.torch == "on" and not torch_available():
        fail("--torch on, but `import torch` fails")
    use_torch = args.torch == "on" or (args.torch == "auto" and named_vgg and torch_available())
    bench = Bench(args, cluster, procs, workdir)
    rows = []
    load_at_start = os.getloadavg()[0]
    header = (f"{args.hosts} hosts x {args.ranks_per_host} rank(s), {args.model}, batch {args.batch_size}"
              f"/rank, {args.threads} thread(s), {args.iters} iterations (mean of 1..{args.iters - 1}), "
              f"{cpu_model()}, {len(bench.cpus)} CPUs, {time.strftime('%Y-%m-%d %H:%M %Z')}"
              f"{link_settings(args)}")
    log(f"running: {header}")
    def baselines(rate, when):
        log(f"[{rate}] one process ({when}): dtrain ...")
        single = bench.dtrain_single()
        if not use_torch:
            return single, None
        log(f"[{rate}] one process ({when}): PyTorch ...")
        return single, bench.torch_job("single", 1)

    for rep in range(args.repeat):
        for rate in args.rates:
            cluster.shape(rate)
            before = baselines(rate, "before")
            first_row = len(rows)
            for mode in args.modes:
                for compression in compressions_for(mode, args.grad_compression):
                    rows.append(measure_row(bench, use_torch, rep, rate, mode, compression))
                if args.ref_dtrain:  # the same mode with another build, no PyTorch run
                    rows.append(measure_row(bench, False, rep, rate, mode, "none", args.ref_dtrain))
            # The baseline is the mean of one-process runs before and after the rate's rows.
            after = baselines(rate, "after")
            for row in rows[first_row:]:
                row["single_runs_s"] = [before[0][0], after[0][0]]
                row["single_s"] = (before[0][0] + after[0][0]) / 2
                cpus = [b[0][1] for b in (before, after) if b[0][1] is not None]
                row["single_cpu_s"] = sum(cpus) / len(cpus) if cpus else None
                if use_torch:
                    row["torch_single_runs_s"] = [before[1], after[1]]
                    row["torch_single_s"] = (before[1] + after[1]) / 2
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    header += f", load average {load_at_start:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    print_table(header, rows, args, use_torch)
    if args.repeat > 1:
        print_summary(rows, args, use_torch)


def compressions_for(mode, compressions):
    """--grad-compression values that apply to `mode` (gather-scatter averages in f32)."""
    return [c for c in compressions if c == "none" or mode in ("ddp", "allreduce")]


def measure_row(bench, use_torch, rep, rate, mode, compression, exe=None):
    row = {"rep": rep, "link": rate, "mode": mode + (" [ref]" if exe else ""), "compression": compression,
           "ranks": bench.world, "load1": os.getloadavg()[0]}
    what = f"[{rate}] --mode {mode} --grad-compression {compression}{' with ' + exe if exe else ''}"
    try:
        log(f"{what}: dtrain ...")
        row["dtrain_s"], row["comm_s"], row["cpu_s"] = bench.dtrain_mode(mode, compression, exe)
        if use_torch:
            log(f"{what}: PyTorch ...")
            row["torch_s"] = bench.torch_job(mode, bench.world, compression)
    except RuntimeError as e:
        log(f"{what} FAILED: {e}")
        row["error"] = str(e).splitlines()[0]
    return row


def print_table(header, rows, args, use_torch):
    images = args.batch_size * args.hosts * args.ranks_per_host
    print(f"\n{header}\n")
    cols = ["rep", "link", "mode", "compression", "ranks", "load", "one process ms (before/after)",
            "dtrain ms/it", "images/s", "efficiency", "exposed comm ms", "extra CPU ms"]
    if use_torch:
        cols += ["PyTorch one process ms (before/after)", "PyTorch ms/it", "PyTorch eff.", "PyTorch / dtrain"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        d, t = r.get("dtrain_s"), r.get("torch_s")
        cells = [str(r["rep"]), r["link"], r["mode"], r["compression"], str(r["ranks"]), f"{r['load1']:.1f}",
                 "/".join(f"{v * 1e3:.0f}" for v in r["single_runs_s"]),
                 fmt(d and d * 1e3, ".0f"), fmt(d and images / d, ".1f"),
                 fmt(d and r["single_s"] / d, ".2f"), fmt(r.get("comm_s") and r["comm_s"] * 1e3, ".0f"),
                 fmt(extra_cpu_ms(r), ".0f")]
        if use_torch:
            ts = r.get("torch_single_s")
            cells += ["/".join(f"{v * 1e3:.0f}" for v in r["torch_single_runs_s"]),
                      fmt(t and t * 1e3, ".0f"),
                      fmt(t and ts and ts / t, ".2f"), fmt(t and d and t / d, ".2f") + ("x" if t and d else "")]
        if "error" in r:
            cells.append("FAILED: " + r["error"])
        print("| " + " | ".join(cells) + " |")
    print("\nefficiency = one process's ms/iteration (the mean of one run before and one after each "
          "link rate's rows) / the mode's, at the same batch per rank; exposed comm = rank 0's "
          "comm_seconds per iteration (time spent waiting for collectives); extra CPU = rank 0's "
          "CPU seconds per iteration minus one process's (the communication thread's work and the "
          "bucket copies, on the rank's one core); load = 1-minute load average when the row started.")


def extra_cpu_ms(row):
    cpu, single = row.get("cpu_s"), row.get("single_cpu_s")
    return None if cpu is None or single is None else (cpu - single) * 1e3


def median(values):
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def print_summary(rows, args, use_torch):
    """Per (link, mode, compression): medians over the repeats, and the efficiency range."""
    images = args.batch_size * args.hosts * args.ranks_per_host
    print(f"\nmedians over {args.repeat} repeats (efficiency: median, min-max)\n")
    cols = ["link", "mode", "compression", "dtrain ms/it", "images/s", "efficiency", "exposed comm ms",
            "extra CPU ms"]
    if use_torch:
        cols += ["PyTorch ms/it", "PyTorch eff.", "PyTorch / dtrain"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    keys = []
    for r in rows:
        k = (r["link"], r["mode"], r["compression"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        ok = [r for r in rows if (r["link"], r["mode"], r["compression"]) == k and "dtrain_s" in r]
        if not ok:
            print(f"| {' | '.join(k)} | FAILED |")
            continue
        eff = [r["single_s"] / r["dtrain_s"] for r in ok]
        d = median([r["dtrain_s"] for r in ok])
        comm = [r["comm_s"] for r in ok if r.get("comm_s") is not None]
        extra = [extra_cpu_ms(r) for r in ok if extra_cpu_ms(r) is not None]
        cells = list(k) + [f"{d * 1e3:.0f}", f"{images / d:.1f}",
                           f"{median(eff):.2f} ({min(eff):.2f}-{max(eff):.2f})",
                           fmt(median(comm) * 1e3 if comm else None, ".0f"),
                           fmt(median(extra) if extra else None, ".0f")]
        if use_torch:
            t = [r for r in ok if r.get("torch_s")]
            def med(f):
                return median([f(r) for r in t]) if t else None
            cells += [fmt(med(lambda r: r["torch_s"] * 1e3), ".0f"),
                      fmt(med(lambda r: r["torch_single_s"] / r["torch_s"]), ".2f"),
                      fmt(med(lambda r: r["torch_s"] / r["dtrain_s"]), ".2f")]
        print("| " + " | ".join(cells) + " |")


# ---- collectives -----------------------------------------------------------------------


def parse_bytes(text):
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not m:
        fail(f"bad byte count {text!r} (e.g. 36M)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


RATE_RE = re.compile(r"(\d+(?:\.\d+)?)(gbit|mbit|kbit)")


def rate_bits(rate):
    m = RATE_RE.fullmatch(rate)
    return float(m.group(1)) * {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}[m.group(2)] if m else None


def collectives(args, cluster, procs, workdir):
    bench = Bench(args, cluster, procs, workdir)
    nbytes = parse_bytes(args.bytes)
    sweep = os.path.join(REPO, "target", "release", "examples", "sweep")
    use_sweep = os.path.exists(sweep) and args.tool != "dtrain"
    if args.tool == "sweep" and not use_sweep:
        fail(f"{sweep} is missing: cargo build --release -p transport --example sweep")
    names = ["all_reduce"] + (["all_reduce_bf16"] if use_sweep else [])
    header = (f"all-reduce of {nbytes} B, {bench.world} ranks ({args.hosts} hosts x "
              f"{args.ranks_per_host}), transport {args.transport or 'tcp'}, "
              f"{'sweep example' if use_sweep else 'dtrain bench'}, {cpu_model()}, "
              f"{time.strftime('%Y-%m-%d %H:%M %Z')}{link_settings(args)}")
    log(f"running: {header}")
    rows = []
    for rate in args.rates:
        cluster.shape(rate)
        for rep in range(args.repeat):
            port = bench.next_port()
            job = bench.job(f"bench-{rate}-{rep}")
            for rank, h, core in bench.placement():
                env = dict(bench.host_env(h))
                if use_sweep:
                    env.update({"SWEEP_RANK": str(rank), "SWEEP_PORT": str(port),
                                "SWEEP_MASTER": cluster.ip[0], "SWEEP_NO_MEMCPY": "1"})
                    argv = [sweep, str(bench.world), args.transport or "tcp", str(nbytes), str(nbytes),
                            ",".join(names)]
                else:
                    argv = [args.dtrain, "bench", "--rank", str(rank), "--num-nodes", str(bench.world),
                            "--master-ip", f"{cluster.ip[0]}:{port}", "--transport",
                            args.transport or "tcp", "--collectives", "all-reduce", "--min-bytes",
                            str(nbytes), "--max-bytes", str(nbytes), "--format", "json", "--no-memcpy"]
                job.add(rank, h, cluster.ns[h], core, argv, env)
            results = job.wait()
            bad = [(r, c, t) for r, c, t in results if c != 0]
            if bad:
                r, c, t = bad[0]
                log(f"[{rate}] FAILED: rank {r} exited {c}:\n{tail(t)}")
                continue
            for line in results[0][2].splitlines():
                if line.startswith("{"):
                    row = json.loads(line)
                    row["link"], row["rep"] = rate, rep
                    rows.append(row)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps(row) + "\n")
    print(f"\n{header}\n")
    print("| link | collective | time ms (median of repeats) | all repeats ms | busbw GB/s | "
          "wire bytes/rank | link-bound ms | share of link |")
    print("|---|---|---|---|---|---|---|---|")
    n = bench.world
    for rate in args.rates:
        for name in names:
            times = sorted(r["time_us"] / 1e3 for r in rows if r["link"] == rate and r["collective"] == name)
            if not times:
                continue
            med = times[len(times) // 2]
            # Each rank sends 2(n-1)/n of the buffer in a ring all-reduce; bf16 rows carry half.
            wire = nbytes * 2 * (n - 1) / n * (0.5 if name.endswith("bf16") else 1.0)
            bits = rate_bits(rate)
            bound = wire * 8 / bits * 1e3 if bits else None
            busbw = nbytes * 2 * (n - 1) / n / (med / 1e3) / 1e9
            print(f"| {rate} | {name} | {med:.1f} | {', '.join(f'{t:.1f}' for t in times)} | "
                  f"{busbw:.2f} | {wire / 1e6:.1f} MB | {fmt(bound, '.1f')} | "
                  f"{fmt(bound and bound / med, '.0%')} |")
    print("\nlink-bound = the wire bytes one rank sends / the link rate (tbf counts Ethernet "
          "frames, so ~97 % of the rate is the TCP payload ceiling at MTU 1500).")
    if args.parallel_links:
        parallel_links(args, cluster, bench, nbytes)


def parallel_links(args, cluster, bench, nbytes):
    """The same all-reduce split over K TCP communicators (K sockets, K threads) per pair."""
    exe = os.path.join(REPO, "target", "release", "examples", "parallel_links")
    if not os.path.exists(exe):
        fail(f"{exe} is missing: cargo build --release -p transport --example parallel_links")
    if bench.world != 2:
        fail("--parallel-links needs 2 ranks (--hosts 2 --ranks-per-host 1)")
    results = {}
    for rate in args.rates:
        cluster.shape(rate)
        for rep in range(args.repeat):
            for k in args.parallel_links:
                port = bench.next_port()
                bench.port += k  # the example uses ports port..port+k-1
                job = bench.job(f"links-{rate}-{k}-{rep}")
                for rank, h, core in bench.placement():
                    env = {"PL_RANK": str(rank), "PL_MASTER": cluster.ip[0], "PL_PORT": str(port),
                           "PL_K": str(k), "PL_BYTES": str(nbytes)}
                    job.add(rank, h, cluster.ns[h], core, [exe], env)
                out = job.wait()
                bad = [(r, c, t) for r, c, t in out if c != 0]
                if bad:
                    log(f"[{rate}] parallel links K={k} FAILED: rank {bad[0][0]}:\n{tail(bad[0][2])}")
                    continue
                line = next(l for l in out[0][2].splitlines() if l.startswith("{"))
                results.setdefault((rate, k), []).append(json.loads(line)["median_ms"])
    print(f"\nall-reduce of {nbytes} B split over K TCP communicators (K sockets and threads per "
          "rank pair, ranks pinned as above); per run the median of 8 repetitions\n")
    print("| link | K | median of runs ms | runs ms |")
    print("|---|---|---|---|")
    for (rate, k), times in results.items():
        t = sorted(times)
        print(f"| {rate} | {k} | {t[len(t) // 2]:.1f} | {', '.join(f'{v:.1f}' for v in times)} |")


# ---- main ------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "collectives"], nargs="?", default="train")
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--ranks-per-host", type=int, default=1)
    ap.add_argument("--rates", default="10gbit,1gbit",
                    help="comma-separated tc rates (e.g. 25gbit,10gbit,1gbit) or `none` (unshaped)")
    ap.add_argument("--modes", default="ddp,allreduce,gather-scatter")
    ap.add_argument("--grad-compression", default="none",
                    help="train: comma-separated none,bf16,fp16; each applies to ddp and allreduce rows "
                         "(dtrain's --grad-compression, PyTorch's bf16/fp16_compress_hook)")
    ap.add_argument("--iters", type=int, default=8, help="iterations per run (the first is warm-up)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--model", default="vgg11")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--transport", help="default: tcp with one rank per host, auto with several")
    ap.add_argument("--torch", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--dtrain", default=os.path.join(REPO, "target", "release", "dtrain"))
    ap.add_argument("--ref-dtrain", help="train: also run each mode with this other dtrain binary "
                    "(e.g. a build of main), rows marked [ref]")
    ap.add_argument("--dtrain-arg", action="append", default=[],
                    help="extra dtrain flag for every training run (repeatable), e.g. --dtrain-arg=--bucket-cap-mb=10")
    ap.add_argument("--bytes", default="36M", help="collectives: all-reduce size")
    ap.add_argument("--repeat", type=int,
                    help="collectives: runs per rate (default 3); train: runs of the whole series "
                         "(default 1; with more, a table of medians follows)")
    ap.add_argument("--tool", choices=["auto", "sweep", "dtrain"], default="auto")
    ap.add_argument("--parallel-links", default="",
                    help="collectives: also time the all-reduce over K TCP communicators per pair, "
                         "for each K of this list (e.g. 1,2,4; needs the parallel_links example)")
    ap.add_argument("--mtu", type=int, default=1500)
    ap.add_argument("--sysctl", action="append", default=[],
                    help="KEY=VALUE set in every host namespace (repeatable), e.g. "
                         "net.ipv4.tcp_congestion_control=cubic")
    ap.add_argument("--run-timeout", type=int, default=1200, help="seconds one run may take")
    ap.add_argument("--json", help="also append one JSON object per row to this file")
    args = ap.parse_args()
    args.rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    if args.repeat is None:
        args.repeat = 1 if args.what == "train" else 3
    if args.repeat < 1:
        fail("--repeat must be at least 1")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.grad_compression = [c.strip() for c in args.grad_compression.split(",") if c.strip()]
    for c in args.grad_compression:
        if c not in ("none", "bf16", "fp16"):
            fail(f"bad --grad-compression {c!r} (none, bf16, fp16)")
    try:
        args.parallel_links = [int(k) for k in args.parallel_links.split(",") if k.strip()]
    except ValueError:
        fail(f"bad --parallel-links {args.parallel_links!r} (e.g. 1,2,4)")
    for rate in args.rates:
        if rate != "none" and not RATE_RE.fullmatch(rate):
            fail(f"bad rate {rate!r} (e.g. 10gbit, 500mbit, none)")
    for mode in args.modes:
        if mode not in ("ddp", "allreduce", "gather-scatter"):
            fail(f"bad mode {mode!r} (ddp, allreduce, gather-scatter)")
    if args.hosts < 2 or args.ranks_per_host < 1 or args.iters < 2:
        fail("need --hosts >= 2, --ranks-per-host >= 1, --iters >= 2")
    if os.geteuid() != 0:
        fail("run as root (it creates network namespaces and tc qdiscs)")
    for tool in ("ip", "tc", "taskset"):
        if shutil.which(tool) is None:
            fail(f"`{tool}` not found (apt-get install iproute2 util-linux)")
    if not os.path.exists(args.dtrain):
        fail(f"{args.dtrain} does not exist: run `cargo build --release` first")
    if args.ref_dtrain and not os.path.exists(args.ref_dtrain):
        fail(f"--ref-dtrain {args.ref_dtrain} does not exist")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    remove_stale_namespaces()
    procs = Processes()
    cluster = Cluster(args.hosts, args.mtu, args.sysctl)
    workdir = tempfile.mkdtemp(prefix="dtrain-cluster-bench-")
    code = 0
    try:
        cluster.create()
        (train if args.what == "train" else collectives)(args, cluster, procs, workdir)
    except Interrupted as e:
        log(f"cluster_bench: interrupted ({e}), cleaning up")
        code = 130
    except RuntimeError as e:
        log(f"cluster_bench: error: {e}")
        code = 1
    finally:
        # Cleanup must not be cut short by a second Ctrl-C.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all()
        cluster.destroy()
        if os.environ.get("CLUSTER_BENCH_KEEP_LOGS"):
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()

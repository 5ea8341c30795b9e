#!/usr/bin/env python3
"""Time PyTorch's and dtrain's VGG11 train step one after the other on this machine.

    pip install torch            # (CI does not have it; this script is run by hand)
    python3 scripts/bench_vs_torch.py                  # all rows, best ISA and AVX2 forced
    python3 scripts/bench_vs_torch.py --isa best --rows 1x128 --repeats 3 --steps 5
    python3 scripts/bench_vs_torch.py --isa best --rows 1x128 --precisions f32,bf16 \
        --torch-configs eager,bf16,bf16_cl       # issue 16's comparison

Rows (as issue 8):
  1x128   1 process, 1 thread, batch 128
  2x256   1 process, 2 threads, batch 256
  ddp     DDP, 2 ranks x 1 thread, batch 128 per rank (PyTorch: torch.distributed + gloo,
          2 processes, each pinned to its own CPU as `dtrain launch` pins its ranks)

Both sides train the same VGG11 with batch norm (the model of
engine/tests/fixtures/make_reference.py, a copy of the original model.py) on synthetic
3x32x32 images with SGD lr 0.1, momentum 0.9, weight decay 1e-4, and report the median
time per step after warm-up steps, and their peak RSS (VmHWM; for DDP the largest rank's).
dtrain's single-process rows run the engine's train_step bench (`--child BATCH THREADS`),
its DDP row `dtrain launch --mode ddp --dataset synthetic --no-augment` (mean iteration
time, first iteration excluded, as dtrain prints it).

Configurations (all timed in the same run, each repeat running every one back to back):
PyTorch `--torch-configs` eager (f32), channels_last (f32), bf16 (`torch.autocast("cpu",
torch.bfloat16)` around forward and loss, f32 master weights), bf16_cl (both), compile
(`torch.compile`, optional: slow to warm up); dtrain `--precisions` f32 and bf16 (`--precision`;
the train_step bench reads it from TRAIN_STEP_PRECISION). Each row prints every configuration's
median ms and peak RSS, then dtrain's speed-up over each PyTorch configuration with its spread
over the repeats.

ISA: `best` runs both at the CPU's best instruction set; `avx2` forces AVX2 on both sides
(DTRAIN_SIMD=avx2; ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2). Each pair of
measurements runs back to back, PyTorch first, `--repeats` times; the table shows medians and
the spread (min-max) of the per-repeat ratio.
"""
import argparse
import importlib.util
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
import warnings

# torch warns on import when numpy is missing; irrelevant here.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_MODEL = os.path.join(ROOT, "engine", "tests", "fixtures", "make_reference.py")
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
ROWS = {
    "1x128": dict(label="1 process, 1 thread, batch 128", batch=128, threads=1, ddp=False),
    "2x256": dict(label="1 process, 2 threads, batch 256", batch=256, threads=2, ddp=False),
    "ddp": dict(label="DDP 2 ranks x 1 thread, batch 128/rank", batch=128, threads=1, ddp=True),
}
TORCH_CONFIGS = {
    "eager": "PyTorch eager f32",
    "channels_last": "PyTorch channels_last f32",
    "bf16": "PyTorch bf16 autocast",
    "bf16_cl": "PyTorch bf16 autocast + channels_last",
    "compile": "PyTorch torch.compile f32",
}
ISA_ENV = {
    "best": ({}, {}),
    "avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, {"DTRAIN_SIMD": "avx2"}),
}


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- PyTorch side (child process)


def torch_child(args):
    import torch
    import torch.nn as nn

    torch.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location("make_reference", FIXTURE_MODEL)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    torch.manual_seed(0)
    model = ref.VGG("VGG11")
    if args.world > 1:
        import torch.distributed as dist

        os.sched_setaffinity(0, {args.rank % os.cpu_count()})
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world
        )
        model = nn.parallel.DistributedDataParallel(model)  # broadcast_buffers=True, 25 MB buckets
    channels_last = args.torch_config in ("channels_last", "bf16_cl")
    autocast = args.torch_config in ("bf16", "bf16_cl")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.torch_config == "compile":
        model = torch.compile(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    g = torch.Generator().manual_seed(1 + args.rank)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        # Mixed precision as PyTorch recommends it on CPU: autocast around forward and
        # loss only; backward follows the recorded dtypes; f32 master weights in SGD.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    if args.world > 1:
        torch.distributed.destroy_process_group()
    print("RESULT " + json.dumps({"ms": statistics.median(times), "rss": peak_rss_mb()}), flush=True)


def run_torch(row, args, env, config):
    threads = str(row["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **env)
    common = [sys.executable, os.path.abspath(__file__), "--torch-child", "--batch", str(row["batch"]),
              "--threads", threads, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--torch-config", config]
    world = 2 if row["ddp"] else 1
    port = str(free_port())
    procs = [
        subprocess.Popen(common + ["--rank", str(r), "--world", str(world), "--port", port],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=args.timeout)
        line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            sys.exit(f"PyTorch run failed ({p.returncode}):\n{out}\n{err}")
        results.append(json.loads(line[len("RESULT "):]))
    # The slowest rank sets the pace.
    return max(r["ms"] for r in results), max(r["rss"] for r in results)


# ---------------------------------------------------------------- dtrain side


def cargo_executable(args_list, name):
    """Build with cargo and return the path of the executable called `name`."""
    out = subprocess.run(["cargo"] + args_list + ["--message-format=json"], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["name"] == name:
            return msg["executable"]
    sys.exit(f"cargo did not report an executable named {name}")


def run_with_rusage(cmd, env, timeout):
    """Run `cmd`; return (stdout, largest peak RSS of it and its waited-for descendants, MB).

    Runs through a fresh copy of this script, so RUSAGE_CHILDREN covers only `cmd`."""
    wrapper = [sys.executable, os.path.abspath(__file__), "--rusage-child", "--"] + cmd
    p = subprocess.run(wrapper, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout)
    m = re.search(r"^RUSAGE_MAXRSS_KB (\d+)$", p.stderr, re.M)
    if p.returncode != 0 or m is None:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout, int(m.group(1)) / 1024.0


def rusage_child(cmd):
    rc = subprocess.call(cmd)
    print(f"RUSAGE_MAXRSS_KB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
    sys.exit(rc)


def run_dtrain(row, args, env, exes, precision):
    env = dict(os.environ, **env)
    if not row["ddp"]:
        env.update(TRAIN_STEP_WARMUP=str(args.warmup), TRAIN_STEP_STEPS=str(args.steps),
                   TRAIN_STEP_PRECISION=precision)
        p = subprocess.run([exes["train_step"], "--child", str(row["batch"]), str(row["threads"])],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=args.timeout)
        line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            sys.exit(f"train_step failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        # RESULT batch threads ms fwd_bwd_ms rss_mb cpu_ms
        f = line.split()
        return float(f[3]), float(f[5])
    iters = 1 + args.steps  # dtrain's average excludes the first iteration
    cmd = [exes["dtrain"], "launch", "--nproc-per-node", "2", "--mode", "ddp", "--dataset", "synthetic",
           "--synthetic-train", str(row["batch"] * 2 * (iters + 1)), "--synthetic-test", "64",
           "--batch-size", str(row["batch"]), "--threads", "1", "--max-iters", str(iters),
           "--lr", str(LR), "--momentum", str(MOMENTUM), "--weight-decay", str(WEIGHT_DECAY),
           "--no-augment", "--log-every", "1000000", "--no-progress", "--master-port", str(free_port()),
           "--precision", precision]
    out, rss = run_with_rusage(cmd, env, args.timeout)
    secs = [float(m) for m in re.findall(r"Average time for \d+ iterations: ([0-9.]+)s", out)]
    if len(secs) != 2:
        sys.exit(f"dtrain launch printed {len(secs)} average times:\n{out}")
    return max(secs) * 1e3, rss


# ---------------------------------------------------------------- driver


def cpu_description():
    model, family, model_no, flags = "unknown CPU", "?", "?", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("cpu family"):
                family = line.split(":", 1)[1].strip()
            if line.startswith("model\t"):
                model_no = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    return f"{model} (family {family} model {model_no}), {os.cpu_count()} CPUs, best ISA {isa}"


def spread(values):
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1x128,2x256,ddp", help="comma-separated subset of " + ",".join(ROWS))
    ap.add_argument("--isa", default="best,avx2", help="comma-separated subset of best,avx2")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (dtrain DDP: 1)")
    ap.add_argument("--torch-configs", default="eager,bf16,bf16_cl",
                    help="comma-separated subset of " + ",".join(TORCH_CONFIGS))
    ap.add_argument("--precisions", default="f32,bf16", help="dtrain --precision values (f32, bf16)")
    ap.add_argument("--repeats", type=int, default=1, help="PyTorch/dtrain pairs per row")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    # internal
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rusage-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--torch-config", default="eager", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_child:
        return torch_child(args)
    if args.rusage_child:
        return rusage_child(args.cmd)

    rows = [r.strip() for r in args.rows.split(",")]
    isas = [i.strip() for i in args.isa.split(",")]
    for r in rows:
        if r not in ROWS:
            sys.exit(f"unknown row {r!r} (rows: {', '.join(ROWS)})")
    torch_configs = [c.strip() for c in args.torch_configs.split(",")]
    precisions = [p.strip() for p in args.precisions.split(",")]
    for c in torch_configs:
        if c not in TORCH_CONFIGS:
            sys.exit(f"unknown PyTorch configuration {c!r} ({', '.join(TORCH_CONFIGS)})")
    for p in precisions:
        if p not in ("f32", "bf16"):
            sys.exit(f"unknown precision {p!r} (f32, bf16)")
    for i in isas:
        if i not in ISA_ENV:
            sys.exit(f"unknown ISA {i!r} (best, avx2)")
    exes = {
        "train_step": cargo_executable(["bench", "-p", "engine", "--bench", "train_step", "--no-run"], "train_step"),
        "dtrain": cargo_executable(["build", "--release", "--bin", "dtrain"], "dtrain"),
    }
    import torch  # only to print its version; the measurements run in child processes

    print(f"CPU: {cpu_description()}")
    print(f"PyTorch {torch.__version__}; dtrain at {ROOT}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{args.steps} measured steps after {args.warmup} warm-up steps; {args.repeats} repeat(s)")
    for isa in isas:
        torch_env, dtrain_env = ISA_ENV[isa]
        print(f"\nISA {isa}: PyTorch env {torch_env or '{}'}, dtrain env {dtrain_env or '{}'}")
        for key in rows:
            row = ROWS[key]
            # One list of (ms, MB) per configuration; each repeat runs every configuration
            # back to back, PyTorch first, so drift hits all of them alike.
            runs = {("torch", c): [] for c in torch_configs}
            runs.update({("dtrain", p): [] for p in precisions})
            for _ in range(args.repeats):
                for c in torch_configs:
                    runs[("torch", c)].append(run_torch(row, args, torch_env, c))
                for p in precisions:
                    runs[("dtrain", p)].append(run_dtrain(row, args, dtrain_env, exes, p))
            print(f"\n{row['label']}")
            print(f"  {'configuration':<40} {'ms/step':>9} {'peak MB':>9}")
            for (who, c), v in runs.items():
                name = TORCH_CONFIGS[c] if who == "torch" else f"dtrain --precision {c}"
                ms, mb = statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)
                print(f"  {name:<40} {ms:>9.0f} {mb:>9.0f}")
            for p in precisions:
                for c in torch_configs:
                    ratios = [t[0] / d[0] for t, d in zip(runs[("torch", c)], runs[("dtrain", p)])]
                    print(f"  speed-up dtrain {p} vs {TORCH_CONFIGS[c]:<32} {statistics.median(ratios):>6.2f}x"
                          f"  (spread {spread(ratios)})", flush=True)
    with open("/proc/loadavg") as f:
        print(f"\nload average after the run: {f.read().strip()}")


if __name__ == "__main__":
    main()

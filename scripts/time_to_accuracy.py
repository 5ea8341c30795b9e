#!/usr/bin/env python3
"""Time to a test accuracy: dtrain vs PyTorch on the same recipe (run by hand; needs torch).

    python3 scripts/time_to_accuracy.py --data-dir ./data --epochs 30 --target 90 \\
        --lr 0.1 --lr-schedule onecycle --nesterov --label-smoothing 0.1 --json tta.json

Both sides train the same network (the original model.py VGG, or a `--model` layer spec like
16,M,32,M,64,M), with `--nproc` data-parallel ranks of `--threads` threads each (dtrain:
`dtrain launch` + `--mode ddp`; PyTorch: DistributedDataParallel over gloo, one process per
rank), the same optimizer (SGD momentum, weight decay, Nesterov), schedule (PyTorch's
schedulers stepped every iteration, a warmup through SequentialLR(LinearLR, ...), exactly as
dtrain computes them: see engine/src/schedule.rs), label smoothing, augmentation
(RandomCrop(32, padding=4) + RandomHorizontalFlip, CIFAR-10 normalisation), per-rank batch,
epochs and seed, and both evaluate the whole test set after every epoch. What differs: the
random streams (initial weights, data order, crops) come from each framework's own RNG.

Data: `--dataset cifar10` needs the CIFAR-10 binary version extracted in
DATA_DIR/cifar-10-batches-bin (dtrain downloads it there when it can). `--dataset
fashion-mnist` reads the IDX files from DATA_DIR/fashion-mnist or
/usr/share/datasets/fashion-mnist (28x28 padded to 32x32, grey replicated to 3 channels, as
dtrain does).

Wall time is measured from each run's start (process launch, data loading included) to the
end of each epoch's evaluation, as printed by rank 0. Prints a table (accuracy per epoch,
wall time per epoch, time to --target for each) and writes the same as JSON with --json.
"""
import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "engine", "tests", "fixtures")
MEAN = [125.3, 123.0, 113.9]  # dtrain's CIFAR_MEAN / CIFAR_STD (0..255 units)
STD = [63.0, 62.1, 66.7]
FASHION_DIRS = ["fashion-mnist", "/usr/share/datasets/fashion-mnist"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["cifar10", "fashion-mnist"], default="cifar10")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--model", default="vgg11", help="vgg11 or a layer spec like 64,M,128,M")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128, help="images per rank per iteration")
    p.add_argument("--nproc", type=int, default=2, help="data-parallel ranks")
    p.add_argument("--threads", type=int, default=1, help="compute threads per rank")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--lr-schedule", choices=["constant", "step", "cosine", "onecycle"], default="onecycle")
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--warmup-start-factor", type=float, default=0.1)
    p.add_argument("--lr-milestones", default=None, help="step: epochs, e.g. 15,25")
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--final-lr", type=float, default=0.0)
    p.add_argument("--pct-start", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=90.0, help="test accuracy in percent")
    p.add_argument("--dtrain", default=os.path.join(ROOT, "target", "release", "dtrain"))
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-dtrain", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--torch-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--torch-port", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


# --- data, as dtrain reads it ------------------------------------------------------------
def load_cifar(data_dir):
    import torch

    d = os.path.join(data_dir, "cifar-10-batches-bin")

    def read(names):
        raw = b"".join(open(os.path.join(d, n), "rb").read() for n in names)
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, 3073)
        return t[:, 1:].reshape(-1, 3, 32, 32).clone(), t[:, 0].long().clone()

    missing = [n for n in ["data_batch_1.bin", "test_batch.bin"] if not os.path.exists(os.path.join(d, n))]
    if missing:
        sys.exit(f"time_to_accuracy: CIFAR-10 not found in {d} (missing {missing}); "
                 "run dtrain once with --data-dir to download it, or extract cifar-10-binary.tar.gz there")
    train = read([f"data_batch_{i}.bin" for i in range(1, 6)])
    return train, read(["test_batch.bin"])


def load_fashion(data_dir):
    import torch

    dirs = [os.path.join(data_dir, FASHION_DIRS[0]), FASHION_DIRS[1]]

    def idx(d, stem):
        for name in (stem, stem + ".gz"):
            path = os.path.join(d, name)
            if os.path.exists(path):
                raw = (gzip.open if name.endswith(".gz") else open)(path, "rb").read()
                ndim = raw[3]
                header = 4 + 4 * ndim
                return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).clone()
        return None

    for d in dirs:
        parts = [idx(d, s) for s in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                     "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]]
        if all(p is not None for p in parts):
            def images(flat):
                x = flat.view(-1, 1, 28, 28)
                x = torch.nn.functional.pad(x, (2, 2, 2, 2))
                return x.expand(-1, 3, -1, -1).contiguous()
            return (images(parts[0]), parts[1].long()), (images(parts[2]), parts[3].long())
    sys.exit(f"time_to_accuracy: Fashion-MNIST not found in {dirs}")


def normalize(x_u8):
    import torch

    mean = torch.tensor(MEAN).view(1, 3, 1, 1) / 255.0
    std = torch.tensor(STD).view(1, 3, 1, 1) / 255.0
    return (x_u8.float() / 255.0 - mean) / std


def augment(x_u8, gen):
    """RandomCrop(32, padding=4) (zero padding) + RandomHorizontalFlip, per image."""
    import torch

    n = x_u8.shape[0]
    padded = torch.nn.functional.pad(x_u8, (4, 4, 4, 4))
    ys = torch.randint(0, 9, (n,), generator=gen)
    xs = torch.randint(0, 9, (n,), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    r = torch.arange(32)
    rows = ys[:, None] + r
    cols = torch.where(flips[:, None], xs[:, None] + 31 - r, xs[:, None] + r)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


# --- the PyTorch side ----------------------------------------------------------------------
def torch_model(spec):
    sys.dont_write_bytecode = True
    sys.path.insert(0, FIXTURES)
    import make_reference as ref

    if spec.lower() == "vgg11":
        return ref.VGG("VGG11")
    layers = [t if t.upper() == "M" else int(t) for t in spec.split(",")]
    layers = ["M" if t in ("m", "M") else t for t in layers]
    ref.cfg["CUSTOM"] = layers
    pools = sum(1 for t in layers if t == "M")
    width = [t for t in layers if t != "M"][-1]
    return ref.VGG("CUSTOM", fc_in=width * (32 // 2 ** pools) ** 2)


def torch_schedule(opt, a, iters_per_epoch):
    """The schedulers dtrain's --lr-schedule matches (see scripts/make_schedule_fixtures.py)."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, MultiStepLR, OneCycleLR, SequentialLR

    total = a.epochs * iters_per_epoch
    warmup = round(a.warmup_epochs * iters_per_epoch)
    if a.lr_schedule == "onecycle":
        return OneCycleLR(opt, max_lr=a.lr, total_steps=total, pct_start=a.pct_start,
                          max_momentum=a.momentum, base_momentum=0.85, div_factor=25.0,
                          final_div_factor=1e4)
    main = None
    if a.lr_schedule == "step":
        ms = [round(float(m) * iters_per_epoch) - warmup for m in a.lr_milestones.split(",")]
        main = MultiStepLR(opt, milestones=ms, gamma=a.lr_gamma)
    elif a.lr_schedule == "cosine":
        main = CosineAnnealingLR(opt, T_max=total - warmup, eta_min=a.final_lr)
    if warmup == 0:
        return main
    lin = LinearLR(opt, start_factor=a.warmup_start_factor, total_iters=warmup)
    return lin if main is None else SequentialLR(opt, [lin, main], milestones=[warmup])


def torch_child(a, rank):
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    t0 = float(os.environ["TTA_T0"])
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.torch_port}",
                            rank=rank, world_size=a.nproc)
    (xtr, ytr), (xte, yte) = load_cifar(a.data_dir) if a.dataset == "cifar10" else load_fashion(a.data_dir)
    torch.manual_seed(a.seed)
    model = nn.parallel.DistributedDataParallel(torch_model(a.model))
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum,
                          weight_decay=a.weight_decay, nesterov=a.nesterov)
    sampler = torch.utils.data.DistributedSampler(range(len(ytr)), num_replicas=a.nproc, rank=rank,
                                                  shuffle=True, seed=a.seed)
    iters = -(-len(sampler) // a.batch_size)
    sched = torch_schedule(opt, a, iters)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)
    gen = torch.Generator().manual_seed(a.seed * 1000 + rank)
    test_idx = torch.arange(rank, len(yte), a.nproc)
    for epoch in range(a.epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        model.train()
        for b in range(iters):
            idx = order[b * a.batch_size:(b + 1) * a.batch_size]
            x = normalize(augment(xtr[idx], gen))
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), ytr[idx]).backward()
            opt.step()
            if sched is not None:
                sched.step()
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for s in range(0, len(test_idx), 256):
                idx = test_idx[s:s + 256]
                out = model.module(normalize(xte[idx]))
                totals[0] += nn.functional.cross_entropy(out, yte[idx], reduction="sum").item()
                totals[1] += (out.argmax(1) == yte[idx]).sum().item()
                totals[2] += len(idx)
        dist.all_reduce(totals)
        if rank == 0:
            print(json.dumps({"epoch": epoch, "test_accuracy": totals[1].item() / totals[2].item(),
                              "test_loss": totals[0].item() / totals[2].item(),
                              "seconds": time.time() - t0}), flush=True)
    dist.destroy_process_group()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torch(a):
    port, t0 = free_port(), time.time()
    env = {**os.environ, "TTA_T0": repr(t0), "OMP_NUM_THREADS": str(a.threads)}
    argv = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:] + ["--torch-port", str(port)]
    procs = [subprocess.Popen(argv + ["--torch-child", str(r)], env=env,
                              stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL, text=True)
             for r in range(a.nproc)]
    epochs = [json.loads(line) for line in procs[0].stdout if line.startswith("{")]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"time_to_accuracy: a PyTorch rank failed: exit codes {codes}")
    return epochs


# --- the dtrain side -----------------------------------------------------------------------
def dtrain_flags(a):
    flags = ["--mode", "ddp", "--dataset", a.dataset, "--data-dir", a.data_dir, "--model", a.model,
             "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--threads", str(a.threads),
             "--lr", str(a.lr), "--momentum", str(a.momentum), "--weight-decay", str(a.weight_decay),
             "--label-smoothing", str(a.label_smoothing), "--lr-schedule", a.lr_schedule,
             "--seed", str(a.seed), "--no-progress", "--log-every", "1000000"]
    if a.nesterov:
        flags.append("--nesterov")
    if a.lr_schedule == "onecycle":
        flags += ["--pct-start", str(a.pct_start)]
    else:
        flags += ["--warmup-epochs", str(a.warmup_epochs), "--warmup-start-factor", str(a.warmup_start_factor)]
    if a.lr_schedule == "step":
        flags += ["--lr-milestones", a.lr_milestones, "--lr-gamma", str(a.lr_gamma)]
    if a.lr_schedule == "cosine":
        flags += ["--final-lr", str(a.final_lr)]
    return flags


TEST_LINE = re.compile(r"Test set: Average loss: ([0-9.]+), Accuracy: (\d+)/(\d+)")


def run_dtrain(a):
    if not os.path.exists(a.dtrain):
        sys.exit(f"time_to_accuracy: no dtrain binary at {a.dtrain} (cargo build --release)")
    cmd = [a.dtrain, "launch", "--nproc-per-node", str(a.nproc), *dtrain_flags(a)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    epochs = []
    for line in proc.stdout:
        m = TEST_LINE.search(line)
        if m:
            epochs.append({"epoch": len(epochs), "test_accuracy": int(m[2]) / int(m[3]),
                           "test_loss": float(m[1]), "seconds": time.time() - t0})
    if proc.wait() != 0:
        sys.exit(f"time_to_accuracy: dtrain failed (exit {proc.returncode}): {' '.join(cmd)}")
    return epochs


def time_to(epochs, target):
    return next((e["seconds"] for e in epochs if 100 * e["test_accuracy"] >= target), None)


def report(a, results):
    names = list(results)
    print(f"\n{a.dataset}, model {a.model}, {a.nproc} ranks x {a.threads} threads, batch {a.batch_size}/rank, "
          f"{a.lr_schedule} lr {a.lr}, {a.epochs} epochs, seed {a.seed}")
    print("epoch | " + " | ".join(f"{n} acc %  {n} s" for n in names))
    for i in range(a.epochs):
        cells = []
        for n in names:
            e = results[n][i] if i < len(results[n]) else None
            cells.append(f"{100 * e['test_accuracy']:8.2f}  {e['seconds']:8.1f}" if e else " " * 18)
        print(f"{i:5d} | " + " | ".join(cells))
    tta = {n: time_to(results[n], a.target) for n in names}
    for n in names:
        t = tta[n]
        print(f"time to {a.target}% ({n}): " + (f"{t:.1f} s" if t is not None else "not reached"))
    if len(names) == 2 and all(tta.values()):
        print(f"ratio dtrain/torch: {tta['dtrain'] / tta['torch']:.3f}")
    # The best accuracy both reached, for runs too short for --target.
    common = min(max((100 * e["test_accuracy"] for e in results[n]), default=0.0) for n in names)
    both = {n: time_to(results[n], common) for n in names}
    print(f"time to {common:.2f}% (the best both reached): "
          + ", ".join(f"{n} {t:.1f} s" for n, t in both.items()))
    if len(names) == 2:
        print(f"ratio dtrain/torch at {common:.2f}%: {both['dtrain'] / both['torch']:.3f}")
    return {"target": tta, "common_percent": common, "common": both}


def main():
    a = parse_args()
    if a.torch_child is not None:
        return torch_child(a, a.torch_child)
    results = {}
    if not a.skip_dtrain:
        results["dtrain"] = run_dtrain(a)
    if not a.skip_torch:
        results["torch"] = run_torch(a)
    tta = report(a, results)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if not k.startswith("torch_")},
                       "epochs": results, "time_to_seconds": tta}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()

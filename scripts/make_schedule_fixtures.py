#!/usr/bin/env python3
"""PyTorch reference values for engine/tests/pytorch_optim.rs (run by hand; needs torch).

    python3 scripts/make_schedule_fixtures.py      # (re)write the two fixtures

Writes under engine/tests/fixtures/:
- schedules.json   per-iteration learning rate (and momentum) of torch.optim.lr_scheduler
                   schedules, stepped once per iteration as dtrain does: iteration i trains
                   with the value the scheduler holds after i steps. A warmup is
                   SequentialLR([LinearLR(start_factor, total_iters=W), main], milestones=[W]);
                   step milestones are given as absolute iterations (the Rust side's
                   convention) and passed to MultiStepLR relative to the warmup's end.
- optim_loss.json  SGD (momentum, dampening, Nesterov, weight decay; lr and momentum changed
                   between steps as a schedule does) on small float64 tensors: the parameter
                   and momentum buffer after each step; and CrossEntropyLoss(label_smoothing)
                   on given float64 logits: the mean loss and its gradient.

Deterministic (torch.manual_seed); the JSON floats are Python reprs, i.e. exact doubles.
"""
import json
import os

import torch
from torch.optim import SGD
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    MultiStepLR,
    OneCycleLR,
    SequentialLR,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "engine", "tests", "fixtures")


def schedule_values(case):
    """Run the PyTorch scheduler `case` describes; return (lrs, momenta) per iteration."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = SGD([p], lr=case["base_lr"], momentum=0.9)
    total, warmup, kind = case["total_iters"], case["warmup_iters"], case["kind"]
    if kind == "constant":
        main = None
    elif kind == "step":
        rel = [m - warmup for m in case["milestones"]]
        main = MultiStepLR(opt, milestones=rel, gamma=case["gamma"])
    elif kind == "cosine":
        main = CosineAnnealingLR(opt, T_max=total - warmup, eta_min=case["final_lr"])
    elif kind == "onecycle":
        main = OneCycleLR(
            opt,
            max_lr=case["base_lr"],
            total_steps=total,
            pct_start=case["pct_start"],
            anneal_strategy="cos",
            cycle_momentum=case["cycle_momentum"],
            base_momentum=case["base_momentum"],
            max_momentum=case["max_momentum"],
            div_factor=case["div_factor"],
            final_div_factor=case["final_div_factor"],
        )
    else:
        raise ValueError(kind)
    if warmup > 0:
        lin = LinearLR(opt, start_factor=case["warmup_start_factor"], total_iters=warmup)
        sched = lin if main is None else SequentialLR(opt, [lin, main], milestones=[warmup])
    else:
        sched = main
    lrs, moms = [], []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        p.grad = torch.zeros_like(p)
        opt.step()
        if sched is not None:
            sched.step()
    return lrs, moms


def schedule_cases():
    base = dict(warmup_start_factor=0.1, milestones=[], gamma=0.1, final_lr=0.0,
                pct_start=0.3, div_factor=25.0, final_div_factor=1e4,
                cycle_momentum=True, base_momentum=0.85, max_momentum=0.95)
    cases = [
        dict(name="constant", kind="constant", base_lr=0.1, total_iters=50, warmup_iters=0),
        dict(name="constant_warmup", kind="constant", base_lr=0.4, total_iters=185,
             warmup_iters=18, warmup_start_factor=0.25),
        dict(name="step", kind="step", base_lr=0.1, total_iters=185, warmup_iters=0,
             milestones=[74, 148]),
        dict(name="step_warmup", kind="step", base_lr=0.8, total_iters=185, warmup_iters=37,
             milestones=[74, 111, 148], gamma=0.2),
        dict(name="cosine", kind="cosine", base_lr=0.1, total_iters=782, warmup_iters=0),
        dict(name="cosine_warmup", kind="cosine", base_lr=0.2, total_iters=1955,
             warmup_iters=196, final_lr=1e-4),
        dict(name="onecycle", kind="onecycle", base_lr=0.1, total_iters=185, warmup_iters=0),
        dict(name="onecycle_custom", kind="onecycle", base_lr=0.05, total_iters=1000,
             warmup_iters=0, pct_start=0.25, div_factor=10.0, final_div_factor=100.0,
             cycle_momentum=False),
    ]
    out = []
    for c in cases:
        case = {**base, **c}
        case["lr"], case["momentum"] = schedule_values(case)
        out.append(case)
    return out


def sgd_cases():
    """Four steps of torch.optim.SGD (single-tensor path, float64) per setting."""
    settings = [
        dict(name="nesterov_wd", momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2),
        dict(name="nesterov", momentum=0.8, dampening=0.0, nesterov=True, weight_decay=0.0),
        dict(name="dampening_wd", momentum=0.8, dampening=0.3, nesterov=False, weight_decay=5e-4),
        dict(name="plain_momentum", momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-4),
        dict(name="no_momentum", momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.1),
        # lr and momentum changed before each step, as OneCycleLR does.
        dict(name="scheduled_nesterov", momentum=0.95, dampening=0.0, nesterov=True,
             weight_decay=5e-4, lrs=[0.004, 0.03, 0.1, 0.06], momenta=[0.95, 0.9, 0.85, 0.88]),
    ]
    out = []
    for i, s in enumerate(settings):
        torch.manual_seed(100 + i)
        p0 = torch.randn(7, dtype=torch.float64)
        grads = [torch.randn(7, dtype=torch.float64) for _ in range(4)]
        lrs = s.get("lrs", [0.1] * 4)
        momenta = s.get("momenta", [s["momentum"]] * 4)
        p = torch.nn.Parameter(p0.clone())
        opt = SGD([p], lr=lrs[0], momentum=s["momentum"], dampening=s["dampening"],
                  nesterov=s["nesterov"], weight_decay=s["weight_decay"], foreach=False)
        values, buffers = [], []
        for k, g in enumerate(grads):
            opt.param_groups[0]["lr"] = lrs[k]
            opt.param_groups[0]["momentum"] = momenta[k]
            p.grad = g.clone()
            opt.step()
            values.append(p.detach().tolist())
            buf = opt.state[p].get("momentum_buffer")
            buffers.append(None if buf is None else buf.tolist())
        out.append({**s, "lrs": lrs, "momenta": momenta, "initial": p0.tolist(),
                    "grads": [g.tolist() for g in grads], "values": values, "buffers": buffers})
    return out


def loss_cases():
    out = []
    for i, (n, classes, eps) in enumerate([(5, 10, 0.0), (5, 10, 0.1), (3, 7, 0.3),
                                           (4, 2, 1.0), (6, 10, 0.05)]):
        torch.manual_seed(200 + i)
        logits = (torch.randn(n, classes, dtype=torch.float64) * 4).requires_grad_()
        labels = torch.randint(0, classes, (n,))
        loss = torch.nn.CrossEntropyLoss(label_smoothing=eps)(logits, labels)
        loss.backward()
        out.append(dict(n=n, classes=classes, label_smoothing=eps,
                        logits=logits.detach().flatten().tolist(), labels=labels.tolist(),
                        loss=loss.item(), grad=logits.grad.flatten().tolist()))
    return out


def write(name, obj):
    path = os.path.join(OUT, name)
    with open(path, "w") as f:
        json.dump(obj, f)
        f.write("\n")
    print("wrote", os.path.relpath(path, ROOT))


def main():
    torch.set_num_threads(1)
    meta = {"torch": torch.__version__}
    write("schedules.json", {**meta, "schedules": schedule_cases()})
    write("optim_loss.json", {**meta, "sgd": sgd_cases(), "cross_entropy": loss_cases()})


if __name__ == "__main__":
    main()

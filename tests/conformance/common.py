"""Shared pieces of the conformance replays.

Every replay script in this folder follows one official implementation's
protocol step by step on the same tiny float64 model, and writes the
parameters after each optimizer step to a golden JSON file.  The C++ test
(tests/test_conformance.cpp) loads the same initial parameters and batches,
runs the same steps through advtrain::Trainer::step, and compares.

The model: an embedding table (token 0 pads) whose lookup output E may get a
per-example perturbation delta, dropout on E + delta, a first layer
tanh(Linear(H, H)), a masked mean over the real positions, and a linear head
to C classes (C = 1: a regression output of shape [B]).

    first(x)   = tanh(l1(dropout(x)))
    rest(z, m) = l2(sum(z * m, 1) / sum(m, 1))         ([B] when C = 1)
    forward    = rest(first(embedding(ids) + delta), ids != 0)

The C++ side builds the same model (tests/test_conformance.cpp, ConfNet).
"""

import json
import os

import torch
import torch.nn.functional as F

V, H, C = 7, 4, 3
DROPOUT = 0.25
LR = 0.1
HERE = os.path.dirname(os.path.abspath(__file__))

# Batches of the same shape [3, 5]; token 0 pads, lengths differ per example.
BATCHES = [
    ([[1, 2, 3, 4, 0], [5, 6, 2, 0, 0], [3, 1, 4, 1, 5]], [0, 2, 1]),
    ([[6, 5, 0, 0, 0], [2, 2, 3, 4, 1], [4, 6, 1, 0, 0]], [1, 0, 2]),
    ([[3, 3, 5, 6, 0], [1, 4, 0, 0, 0], [2, 5, 6, 1, 3]], [2, 1, 0]),
]
# Targets of the regression variant (C = 1), per batch.
REGRESSION_TARGETS = [[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [-2.0, 1.0, 0.25]]


class Model(torch.nn.Module):
    def __init__(self, classes=C, dropout=DROPOUT):
        super().__init__()
        self.classes = classes
        self.dropout = dropout
        self.embedding = torch.nn.Embedding(V, H, padding_idx=0)
        self.l1 = torch.nn.Linear(H, H)
        self.l2 = torch.nn.Linear(H, classes)
        self.double()

    def first(self, x):
        return torch.tanh(self.l1(F.dropout(x, self.dropout, self.training)))

    def rest(self, z, mask):
        m = mask.unsqueeze(-1).to(z.dtype)
        out = self.l2((z * m).sum(1) / m.sum(1))
        return out.squeeze(-1) if self.classes == 1 else out

    def forward(self, ids, delta=None):
        x = self.embedding(ids)
        if delta is not None:
            x = x + delta
        return self.rest(self.first(x), ids.ne(0))


def make_model(classes=C, dropout=DROPOUT, seed=1):
    """The model with initial values drawn from a private generator (so the
    default generator is untouched); the values are written to the golden."""
    model = Model(classes, dropout)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.7)
        model.embedding.weight[0].zero_()
    return model


def batch(i, classes=C):
    """Batch i as (ids [B, L] long, mask [B, L] float64, labels)."""
    ids, labels = BATCHES[i]
    ids = torch.tensor(ids, dtype=torch.long)
    if classes == 1:
        y = torch.tensor(REGRESSION_TARGETS[i], dtype=torch.float64)
    else:
        y = torch.tensor(labels, dtype=torch.long)
    return ids, ids.ne(0).to(torch.float64), y


def task_loss(out, y):
    """Cross-entropy (batch mean), or mean squared error for regression."""
    if y.dtype == torch.long:
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


def train(step, seed, classes=C, batches=3):
    """The replays' frame: the model and its initial snapshot, plain SGD,
    torch.manual_seed(seed), then `step(model, opt, ids, mask, y)` once per
    batch (one official training step), a snapshot after each.  Returns
    (init, after)."""
    model = make_model(classes=classes)
    init = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    after = []
    torch.manual_seed(seed)
    for i in range(batches):
        ids, mask, y = batch(i, classes=classes)
        step(model, opt, ids, mask, y)
        after.append(snapshot(model))
    return init, after


def max_diff(a, b):
    """Largest difference between two lists of snapshots, in float64."""
    d = 0.0
    for snap_a, snap_b in zip(a, b):
        for k in snap_a:
            ta = torch.tensor(snap_a[k], dtype=torch.float64)
            tb = torch.tensor(snap_b[k], dtype=torch.float64)
            d = max(d, (ta - tb).abs().max().item())
    return d


def snapshot(model):
    return {n: p.detach().tolist() for n, p in model.named_parameters()}


def case(name, method, target, options, model, seed, batches, after,
         share_dropout_mask, classes=C, dropout=DROPOUT, note=""):
    """One golden case.

    method: the advtrain class name (FGM, PGD, FreeAT, FreeLB, FreeLBLInf,
      SMART, YOPO); target: "table" (the embedding weight) or "examples"
      (the per-example delta on the lookup output); options: advtrain option
      names -> values; share_dropout_mask: whether the official protocol's
      passes of one step see the same dropout masks; model: the model
      *before* training (its parameters are the initial values); seed:
      torch.manual_seed(seed) is called right before the first step; batches:
      the indices into BATCHES, one optimizer step (Trainer::step) each;
      after: snapshot() after each step.
    """
    return {
        "name": name, "method": method, "target": target,
        "options": dict(options, share_dropout_mask=share_dropout_mask),
        "classes": classes, "dropout": dropout, "lr": LR, "seed": seed,
        "init": model, "batches": batches, "after": after, "note": note,
    }


def write(filename, official, cases):
    """Writes the golden file tests/conformance/<filename>."""
    with open(os.path.join(HERE, filename), "w") as f:
        data = [{"ids": ids, "labels": labels, "targets": targets}
                for (ids, labels), targets in zip(BATCHES, REGRESSION_TARGETS)]
        json.dump({"official": official, "batches": data, "cases": cases},
                  f, indent=1)
        f.write("\n")

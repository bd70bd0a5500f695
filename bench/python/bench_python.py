"""The Python side of advtrain's comparison: the widely used FGM and PGD
classes (attack/restore/backup_grad/restore_grad, as the blog posts describe
them: the whole embedding table cloned at every attack), on the same model
and shapes as advtrain_bench. Prints one line per method: "ms NAME MEDIAN".

Run with Debian's python3-torch (the same ATen as libtorch-dev):
    /usr/bin/python3 bench/python/bench_python.py --threads 2
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class FGM:
    """r = epsilon * g / ||g|| on every parameter whose name has emb_name."""

    def __init__(self, model, emb_name="embedding", epsilon=1.0):
        self.model, self.emb_name, self.epsilon = model, emb_name, epsilon
        self.backup = {}

    def _targets(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                yield name, param

    def attack(self):
        for name, param in self._targets():
            self.backup[name] = param.data.clone()
            norm = torch.norm(param.grad)
            if norm != 0 and not torch.isnan(norm):
                param.data.add_(self.epsilon * param.grad / norm)

    def restore(self):
        for name, param in self._targets():
            param.data = self.backup[name]
        self.backup = {}


class PGD:
    """K steps of alpha * g / ||g||, projected onto ||r|| <= epsilon."""

    def __init__(self, model, emb_name="embedding", epsilon=1.0, alpha=0.3):
        self.model, self.emb_name = model, emb_name
        self.epsilon, self.alpha = epsilon, alpha
        self.emb_backup, self.grad_backup = {}, {}

    def _targets(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                yield name, param

    def attack(self, is_first_attack=False):
        for name, param in self._targets():
            if is_first_attack:
                self.emb_backup[name] = param.data.clone()
            norm = torch.norm(param.grad)
            if norm != 0 and not torch.isnan(norm):
                param.data.add_(self.alpha * param.grad / norm)
                param.data = self.project(name, param.data)

    def project(self, name, data):
        r = data - self.emb_backup[name]
        if torch.norm(r) > self.epsilon:
            r = self.epsilon * r / torch.norm(r)
        return self.emb_backup[name] + r

    def restore(self):
        for name, param in self._targets():
            param.data = self.emb_backup[name]
        self.emb_backup = {}

    def backup_grad(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                self.grad_backup[name] = param.grad.clone()

    def restore_grad(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                param.grad = self.grad_backup[name]


class BenchNet(nn.Module):
    """Embedding -> (transformer encoder layer) -> mean -> tanh -> linear,
    as advtrain_bench's model."""

    def __init__(self, vocab, hidden, encoder=True):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.encoder = nn.TransformerEncoderLayer(
            hidden, 4, dim_feedforward=4 * hidden,
            dropout=0.1) if encoder else None
        self.out = nn.Linear(hidden, 2)

    def forward(self, ids):
        h = self.embedding(ids)
        if self.encoder is not None:
            h = self.encoder(h.transpose(0, 1)).transpose(0, 1)
        return self.out(torch.tanh(h.mean(1)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=30000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bag", action="store_true",
                   help="no encoder layer: embedding -> mean -> tanh -> linear")
    p.add_argument("--runner", choices=["plain", "fgm", "pgd"],
                   help="run this runner alone for --steps steps, untimed "
                        "(for valgrind)")
    p.add_argument("--steps", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.runner is None:
        print(f"python: torch {torch.__version__}, {a.threads} threads")

    def setup():
        torch.manual_seed(1)
        model = BenchNet(a.vocab, a.hidden, encoder=not a.bag)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randint(a.vocab, (a.batch, a.length))
        y = torch.randint(2, (a.batch,))
        return model, opt, x, y

    def plain_step(model, opt, x, y, _):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def fgm_step(model, opt, x, y, fgm):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        fgm.attack()
        F.cross_entropy(model(x), y).backward()
        fgm.restore()
        opt.step()

    def pgd_step(model, opt, x, y, pgd, k=3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pgd.backup_grad()
        for t in range(k):
            pgd.attack(is_first_attack=(t == 0))
            if t != k - 1:
                model.zero_grad()
            else:
                pgd.restore_grad()
            F.cross_entropy(model(x), y).backward()
        pgd.restore()
        opt.step()

    runners = []
    for name, fn, attacker in [("plain", plain_step, None),
                               ("fgm", fgm_step, FGM),
                               ("pgd", pgd_step, PGD)]:
        if a.runner is not None and name != a.runner:
            continue
        model, opt, x, y = setup()
        runners.append((name, fn, (model, opt, x, y,
                                   attacker(model) if attacker else None), []))
    if a.runner is not None:
        _, fn, args, _ = runners[0]
        for _ in range(a.steps):
            fn(*args)
        print(f"ran {a.runner} x {a.steps}")
        return
    for r in range(-a.warmup, a.repeats):
        for name, fn, args, times in runners:
            t0 = time.perf_counter()
            fn(*args)
            t1 = time.perf_counter()
            if r >= 0:
                times.append(1000.0 * (t1 - t0))
    for name, _, _, times in runners:
        print(f"ms {name} {statistics.median(times):.3f}")


if __name__ == "__main__":
    main()

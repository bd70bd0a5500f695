"""Conformance replay: the FGM and PGD classes widely copied in Chinese NLP
competition code (after Su Jianlin's post https://spaces.ac.cn/archives/7234
and the matching Zhihu write-up), which perturb the embedding WEIGHT TABLE.

Concrete repository followed (public code index):
  yangyubuaa/Adversarial_Training
    fgm.py (commit 79315459): class FGM
        attack(epsilon=1., emb_name): for the parameter whose name contains
            emb_name: backup[name] = data.clone(); norm = torch.norm(grad)
            (one L2/Frobenius norm over the WHOLE table, no epsilon in the
            denominator); if norm != 0 and not nan: data += epsilon*grad/norm
        restore(): data = backup[name]
    train_framework.py (commit 58bb9465): per batch
        loss.backward(); fgm.attack(); loss_adv = model(...);
        loss_adv.backward()  (accumulates onto the clean gradient);
        fgm.restore(); optimizer.step(); model.zero_grad()
    pgd.py (commit 3435d201): class PGD
        attack(epsilon=1., alpha=0.3, emb_name, is_first_attack): on the first
            attack backup the table; norm = torch.norm(grad) (whole table);
            if norm != 0 (no nan check): data += alpha*grad/norm, then
            data = project(...)
        project: r = data - backup; if torch.norm(r) > epsilon:
            r = epsilon*r/torch.norm(r)  (L2 ball over the whole table)
        backup_grad / restore_grad: clone every parameter's grad / put the
            clones back (param.grad = backup)
        restore(): data = emb_backup
        (the file itself lacks `import torch`.)
    pgd_framework.py (commit 3435d201): K = 3; per batch
        loss.backward(); pgd.backup_grad()
        for t in range(K):
            pgd.attack(is_first_attack=(t == 0))
            if t != K-1: model.zero_grad()  else: pgd.restore_grad()
            loss_adv = model(...); loss_adv.backward()
        pgd.restore(); optimizer.step(); model.zero_grad()
      So attack t >= 1 uses the gradient of the previous adversarial pass
      alone; the step uses clean grad + the last adversarial pass's grad.

Adaptations: emb_name is the parameter `embedding.weight` (only that name
contains it); float64; dropout draws fresh masks at every forward in program
order (share_dropout_mask False).  The padding row 0 gets a zero gradient
from nn.Embedding(padding_idx=0) and so is never perturbed (it is still
inside the table norm, contributing zero).
This script is written from a reading of the code, not copied.
"""

import torch

import common

EMB = "embedding.weight"


def emb_param(model):
    return dict(model.named_parameters())[EMB]


def fgm_step(model, opt, ids, y, eps):
    loss = common.task_loss(model(ids), y)
    loss.backward()
    p = emb_param(model)
    backup = p.data.clone()
    n = torch.norm(p.grad)
    if n != 0 and not torch.isnan(n):
        p.data.add_(eps * p.grad / n)
    common.task_loss(model(ids), y).backward()
    p.data = backup
    opt.step()
    model.zero_grad()


def pgd_step(model, opt, ids, y, eps, alpha, k, stats):
    loss = common.task_loss(model(ids), y)
    loss.backward()
    grad_backup = {n: q.grad.clone() for n, q in model.named_parameters()}
    p = emb_param(model)
    emb_backup = None
    for t in range(k):
        if t == 0:
            emb_backup = p.data.clone()
        n = torch.norm(p.grad)
        if n != 0:
            p.data.add_(alpha * p.grad / n)
            r = p.data - emb_backup
            if torch.norm(r) > eps:
                stats["projections"] += 1
                r = eps * r / torch.norm(r)
            p.data = emb_backup + r
        if t != k - 1:
            model.zero_grad()
        else:
            for name, q in model.named_parameters():
                q.grad = grad_backup[name]
        common.task_loss(model(ids), y).backward()
    p.data = emb_backup
    opt.step()
    model.zero_grad()


def run(method, opts, seed, stats):
    def step(model, opt, ids, _mask, y):
        if method == "FGM":
            fgm_step(model, opt, ids, y, opts["epsilon"])
        else:
            pgd_step(model, opt, ids, y, opts["epsilon"], opts["alpha"],
                     opts["steps"], stats)
    return common.train(step, seed)


def main():
    cases = []
    specs = [
        ("fgm_eps1", "FGM", dict(epsilon=1.0), 301,
         "yangyubuaa/Adversarial_Training fgm.py + train_framework.py: clean backward; "
         "table += epsilon*grad/||grad||_F (whole table, skipped if the norm is 0 or nan); "
         "adversarial forward+backward accumulating onto the clean grads; restore the "
         "table; SGD step; zero_grad. Fresh dropout masks per forward. float64."),
        ("pgd_k3", "PGD", dict(epsilon=0.5, alpha=0.3, steps=3), 302,
         "yangyubuaa/Adversarial_Training pgd.py + pgd_framework.py: clean backward; "
         "backup grads; for t<K: table += alpha*grad/||grad||_F (grad = clean grad at "
         "t=0, else the previous adversarial pass's grad alone; skipped if the norm is 0), "
         "project the table change onto the L2 (Frobenius, whole table) ball of radius "
         "epsilon; zero_grad for t<K-1, restore the clean grads at t=K-1; adversarial "
         "forward+backward. Restore the table; SGD step (clean + last adversarial grad); "
         "zero_grad. Fresh dropout masks per forward. float64."),
    ]
    for name, method, opts, seed, note in specs:
        stats = {"projections": 0}
        init, after = run(method, opts, seed, stats)
        moved = max(abs(a - b) for k in init
                    for a, b in zip(torch.tensor(init[k]).flatten().tolist(),
                                    torch.tensor(after[-1][k]).flatten().tolist()))
        print(f"{name}: max param change over 3 steps {moved:.3e}"
              + (f"; projection bound {stats['projections']} of 9 attacks"
                 if method == "PGD" else ""))
        cases.append(common.case(name, method, "table", opts, init, seed, [0, 1, 2],
                                 after, share_dropout_mask=False, note=note))
    common.write("fgm_pgd.json",
                 "yangyubuaa/Adversarial_Training fgm.py, pgd.py, train_framework.py, "
                 "pgd_framework.py (the widely copied FGM/PGD embedding-table classes)",
                 cases)


if __name__ == "__main__":
    main()

"""Conformance replay: AWP (adversarial weight perturbation) as NLP
fine-tuning uses it, through the widely copied `AWP` class of the Kaggle
NLP competitions (Feedback Prize, NBME, CommonLit, ...).

Followed (public code index; line numbers counted by hand, +-2):

  jashdalvi/commonlit-nlp src/awp.py (commit 2f172d1b), class AWP:
    l.3-25   __init__(model, optimizer, adv_param="weight", adv_lr=1,
             adv_eps=0.2, start_epoch=0, adv_step=1, loss_fn=None,
             scaler=None): the class's own defaults are adv_lr 1 and
             adv_eps 0.2 (the same in every copy of this signature read:
             furu-kaggle, rohitsingh02, the Feedback Prize copies).
    l.27-41  attack_backward(batch, epoch): return if adv_lr == 0 or epoch <
             start_epoch; _save(); adv_step times: _attack_step(); forward
             (autocast) and adv_loss = loss_fn(outputs, targets).mean();
             optimizer.zero_grad(); scaler.scale(adv_loss).backward();
             then _restore().
    l.43-55  _attack_step(): e = 1e-6; for every named parameter with
             requires_grad, grad is not None and `adv_param in name` (a
             substring test): norm1 = torch.norm(param.grad), norm2 =
             torch.norm(param.data.detach()) (whole-tensor L2 norms; norm2
             of the CURRENT, possibly already perturbed, weights); if norm1
             != 0 and not isnan(norm1): param.data.add_(adv_lr * grad /
             (norm1 + e) * (norm2 + e)); param.data = min(max(param.data,
             lo), hi).
    l.57-66  _save(): for the same parameters, once per attack: backup =
             param.data.clone(); grad_eps = adv_eps * |param|; (lo, hi) =
             (backup - grad_eps, backup + grad_eps): an elementwise box
             relative to |w0| (rows of |w0| = 0, e.g. a padding row, are
             pinned).
    l.68-73  _restore(): param.data = backup; backups cleared.
  jashdalvi/commonlit-nlp src/train.py (commit 76e49327), train(): model.
    train(); per batch: forward, loss, scaler.scale(loss).backward(); if
    cfg.use_awp: awp.attack_backward(batch, epoch); then (every
    gradient_accumulation_steps) scaler.unscale_, clip_grad_norm_,
    scaler.step(optimizer), scaler.update(), optimizer.zero_grad(),
    scheduler.step().  main_fold(): AWP(model, optimizer, adv_lr=cfg.adv_lr,
    adv_eps=cfg.adv_eps, start_epoch=cfg.awp_start_epoch, loss_fn=criterion,
    scaler=scaler).
  furu-kaggle/feedback_local src/awp.py (commit 9bbae5cd): the same class
    (l.20-40 __init__ with the same defaults, l.42-56 attack_backward with
    the loss returned by the model / n_accumulate, l.58-71 _attack_step,
    l.73-84 _save, l.86-92 _restore); src/trainer.py train_one_epoch():
    scaler.scale(loss).backward(); self.awp.attack_backward(data, epoch,
    config) (when adv_th > best_epoch_loss); scaler.step; scaler.update;
    scheduler.step; optimizer.zero_grad().

Protocol replayed per step (advtrain names: name = adv_param, alpha =
adv_lr, epsilon = adv_eps, steps = adv_step):
  clean forward, cross-entropy (batch mean), backward;
  selected = parameters with requires_grad, grad not None, name in their
    name; w0 = their values; lo/hi = w0 -/+ epsilon * |w0|;
  steps times: for each selected p: n1 = ||p.grad||, n2 = ||p|| (current);
    if n1 != 0 and not nan: p += alpha * p.grad / (n1 + 1e-6) * (n2 + 1e-6);
    p = min(max(p, lo), hi); then the adversarial forward, cross-entropy,
    optimizer.zero_grad() (ALL parameters: the clean gradient is dropped),
    backward;
  restore w0; SGD step with the last adversarial gradient (taken at the
  perturbed weights); zero_grad.
With steps >= 2 the second attack step's direction is the first
adversarial pass's gradient.

Adaptations (see README.md here):
  * scaler / autocast not used, float64 throughout.  The copies call
    self.scaler.scale(...) unconditionally (scaler=None would fail); a
    plain backward is what GradScaler(enabled=False) does.
  * AdamW + scheduler + clip_grad_norm_ + gradient accumulation -> plain
    SGD (common.LR), no clipping, one batch per step.  (With accumulation
    the copies' optimizer.zero_grad() inside attack_backward also drops the
    earlier micro-batches' gradients; not exercised here.)
  * start_epoch 0 (the attack runs every step); adv_lr != 0.
  * the adversarial loss is the task loss (jashdalvi's train.py passes
    loss_fn=criterion (MSE) while its clean loss may be MCRMSE; furu-kaggle
    uses the model's own loss for both): here cross-entropy for both.
  * dropout: every forward draws fresh masks in program order (clean pass,
    then one per attack step); nothing else draws random numbers.
    share_dropout_mask = False.
  * the embedding's padding row (padding_idx 0) has a zero gradient and
    w0 = 0, so it moves by 0 and its box is [0, 0]; it contributes 0 to
    both whole-tensor norms.  Nothing else is special about it.
The original AWP code (csdongxian/AWP, Wu et al., NeurIPS 2020,
trades_AWP/train_trades_cifar.py with utils_awp.py) is for images and
differs: one SGD step of a proxy model on the negated adversarial loss,
the per-layer difference rescaled to ||w|| and added with gamma to the
multi-dimensional weights, the step's gradient taken at w + v and v
subtracted after optimizer.step(), no clamp and no clean pass; not what is
replayed here.
This script is written from a reading of the code above, not copied.
"""

import torch

import common

E = 1e-6  # _attack_step's `e`


def attack_backward(model, opt, ids, y, opts, variant, stats):
    """AWP.attack_backward + _save/_attack_step/_restore.  variant:
    None (official), "accumulate" (no zero_grad before the adversarial
    backward: clean + adversarial gradients; not official), "norm2_w0"
    (norm2 taken at the saved weights; not official)."""
    name = opts["name"]

    def selected():
        return [(n, p) for n, p in model.named_parameters()
                if p.requires_grad and p.grad is not None and name in n]

    backup, bounds = {}, {}
    for n, p in selected():  # _save
        backup[n] = p.data.clone()
        grad_eps = opts["epsilon"] * p.abs().detach()
        bounds[n] = (backup[n] - grad_eps, backup[n] + grad_eps)
    for _ in range(opts["steps"]):
        for n, p in selected():  # _attack_step
            norm1 = torch.norm(p.grad)
            ref = backup[n] if variant == "norm2_w0" else p.data.detach()
            norm2 = torch.norm(ref)
            if norm1 != 0 and not torch.isnan(norm1):
                r_at = opts["alpha"] * p.grad / (norm1 + E) * (norm2 + E)
                p.data.add_(r_at)
                p.data = torch.min(torch.max(p.data, bounds[n][0]), bounds[n][1])
            lo, hi = bounds[n]
            free = hi > lo  # elements with |w0| > 0 (not pinned)
            on = ((p.data == lo) | (p.data == hi)) & free
            stats["on_bound"] += int(on.sum())
            stats["free"] += int(free.sum())
        adv_loss = common.task_loss(model(ids), y)
        if variant != "accumulate":
            opt.zero_grad()
        adv_loss.backward()
    for n, p in model.named_parameters():  # _restore
        if n in backup:
            p.data = backup[n]
    stats["selected"] = sorted(backup)


def run(opts, seed, variant=None, attack=True):
    stats = {"on_bound": 0, "free": 0, "selected": [], "pad_grad": 0.0}

    def step(model, opt, ids, _mask, y):
        loss = common.task_loss(model(ids), y)
        loss.backward()
        stats["pad_grad"] = max(stats["pad_grad"],
                                model.embedding.weight.grad[0].abs().max().item())
        if attack:
            attack_backward(model, opt, ids, y, opts, variant, stats)
        opt.step()
        opt.zero_grad()
    init, after = common.train(step, seed)
    return init, after, stats


NOTE = ("The widely copied AWP class (Kaggle NLP): clean forward, CE (batch mean), backward; "
        "_save: every parameter with requires_grad, grad not None and options.name as a "
        "SUBSTRING of its name is backed up, box w0 -/+ epsilon*|w0| (elementwise); steps "
        "times: per such parameter norm1 = ||grad||, norm2 = ||current weights|| (whole "
        "tensors), if norm1 != 0 and not nan: w += alpha*grad/(norm1+1e-6)*(norm2+1e-6), "
        "clamped into the box; adversarial forward, CE, optimizer.zero_grad() (all "
        "parameters: the clean gradient is dropped), backward; restore w0; SGD step with "
        "the last adversarial gradient. Fresh dropout masks in program order: clean pass, "
        "one per attack step. float64, no GradScaler/autocast (scaler.scale -> plain "
        "backward), no clipping/accumulation, start_epoch 0. The padding row (grad 0, "
        "w0 = 0) moves by 0.")

CASES = [
    ("awp_defaults", dict(name="weight", alpha=1.0, epsilon=1e-4, steps=1), 401),
    ("awp_a0.5_e0.05_k2", dict(name="weight", alpha=0.5, epsilon=0.05, steps=2), 402),
    ("awp_l1_a0.1_e0.2", dict(name="l1", alpha=0.1, epsilon=0.2, steps=1), 403),
]


def main():
    cases = []
    for name, opts, seed in CASES:
        init, after, stats = run(opts, seed)
        _, after_plain, _ = run(opts, seed, attack=False)
        _, after_acc, _ = run(opts, seed, variant="accumulate")
        moved = common.max_diff([init] + after[:-1], after)
        pad = max(abs(v) for snap in after for v in snap["embedding.weight"][0])
        line = (f"{name}: selected {stats['selected']}; max param change per step "
                f"{moved:.3e}; vs plain step {common.max_diff(after, after_plain):.3e}; "
                f"clean+adv grads {common.max_diff(after, after_acc):.3e}; on a bound after "
                f"attack steps {stats['on_bound']}/{stats['free']} (elements with "
                f"|w0| > 0, summed over attack steps); padding-row grad "
                f"{stats['pad_grad']:.1e}, padding row max |w| {pad:.1e}")
        if opts["steps"] >= 2:
            _, after_w0, _ = run(opts, seed, variant="norm2_w0")
            line += f"; norm2 at w0: {common.max_diff(after, after_w0):.3e}"
        print(line)
        cases.append(common.case(
            name, "AWP", "parameters", opts, init, seed, [0, 1, 2], after,
            share_dropout_mask=False, note=NOTE))
    common.write("awp_class.json",
                 "the widely copied AWP class: jashdalvi/commonlit-nlp src/awp.py, "
                 "src/train.py; furu-kaggle/feedback_local src/awp.py, src/trainer.py",
                 cases)


if __name__ == "__main__":
    main()

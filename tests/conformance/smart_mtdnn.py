"""Conformance replay: SMART as implemented in namisan/mt-dnn.

Follows (read through the public code index, commit 676b48b1 of
namisan/mt-dnn, the newest stored version with `stable_kl` and the K loop):

  mt_dnn/perturbation.py
    generate_noise (l.16-20): noise = embed.new(embed.size()).normal_(0, 1)
        * noise_var -- a standard normal times noise_var (used as a standard
        deviation, not a variance), of the full embed shape [B, L, H], NOT
        masked (the `mask` argument is unused in this version).
    SmartPerturbation.__init__ (l.23-50): defaults epsilon=1e-6, step_size,
        noise_var=1e-5, norm_p="inf", k=1, norm_level=0.
    SmartPerturbation._norm_grad (l.52-74): norm_p "inf" (the default) and
        norm_level 0 -> per token: x / (max_h |x| + epsilon).  ("l2" would
        raise UnboundLocalError: eff_direction is only set in the inf branch.)
    SmartPerturbation.forward (l.76-152):
        l.104  embed = model(..., fwd_type=1)  (the embedding output, not detached)
        l.105  noise = generate_noise(...)
        l.106  for step in range(K):
        l.117-123  adv_logits = model(embed + noise); ascent loss is
               mse_loss(adv, logits.detach(), reduction="sum") for regression
               or stable_kl(adv, logits.detach(), reduce=False) (a SUM over
               the batch, no 1/B) otherwise
        l.124  delta_grad = autograd.grad(adv_loss, noise)  (no parameter grads)
        l.127-129  if the L2 norm of delta_grad is nan/inf: `return 0`
        l.131-136  noise = _norm_grad(noise + step_size * delta_grad), detached
               (the noise itself is inside the normalization)
        l.137-151  adv_logits = model(embed + noise);
               adv_loss = adv_lc(logits, adv_logits)  (clean logits NOT detached)
  mt_dnn/loss.py
    stable_kl (l.11-22): p = softmax(logit), y = softmax(target) (as
        log_softmax().exp(), after .float()), rp/ry = -log(1/(q + 1e-6) - 1 +
        1e-6) DETACHED, value sum(p * (rp - ry) * 2), divided by the batch size
        only when reduce=True.
    MseCriterion (l.80-95): mse_loss(input.squeeze(), target) * alpha (mean).
    SymKlCriterion (l.133-155): kl_div(log_softmax(input), softmax(target.detach()),
        batchmean) + kl_div(log_softmax(target), softmax(input.detach()),
        batchmean), everything cast to float32.
  mt_dnn/model.py, MTDNNModel.update: network.train(); logits = mnetwork(inputs);
      loss = task criterion (CeCriterion: cross_entropy mean; MseCriterion);
      adv_loss, ... = adv_teacher.forward(mnetwork, logits, ...);
      loss = loss + config["adv_alpha"] * adv_loss; loss.backward();
      optimizer.step(); optimizer.zero_grad().
  experiments/glue/glue_task_def.yml: classification tasks use
      adv_loss: SymKlCriterion, the regression task (stsb) adv_loss: MseCriterion.
  train.py defaults: adv_p_norm inf, adv_alpha 1, adv_k 1, adv_step_size 1e-5
      (1e-3 in older versions), adv_noise_var 1e-5, adv_epsilon 1e-6.

Adaptations to this model (see README.md here):
  * "embed" is the embedding lookup output; embed + noise is passed as
    Model.forward(ids, delta=noise) (same value, and the final pass's gradient
    reaches the embedding table as in mt-dnn where embed is not detached).
  * everything in float64; the official .float() / dtype=torch.float32 casts
    in stable_kl and SymKlCriterion are not applied.
  * the dropout masks: every forward draws fresh masks in program order
    (clean, noise draw, K ascent passes, final adversarial pass); the official
    code never shares masks.
This script is written from a reading of the official code, not copied.
"""

import torch
import torch.nn.functional as F

import common

STABLE_KL_EPS = 1e-6  # hard-coded default of stable_kl, never passed by SMART


def stable_kl(logit, target, reduce=True, epsilon=STABLE_KL_EPS):
    """mt_dnn/loss.py stable_kl, kept in float64."""
    logit = logit.view(-1, logit.size(-1))
    target = target.view(-1, target.size(-1))
    bs = logit.size(0)
    p = F.log_softmax(logit, 1).exp()
    y = F.log_softmax(target, 1).exp()
    rp = -(1.0 / (p + epsilon) - 1 + epsilon).detach().log()
    ry = -(1.0 / (y + epsilon) - 1 + epsilon).detach().log()
    total = (p * (rp - ry) * 2).sum()
    return total / bs if reduce else total


def sym_kl_criterion(inp, target):
    """mt_dnn/loss.py SymKlCriterion (alpha 1, batchmean), float64."""
    return (F.kl_div(F.log_softmax(inp, dim=-1),
                     F.softmax(target.detach(), dim=-1), reduction="batchmean")
            + F.kl_div(F.log_softmax(target, dim=-1),
                       F.softmax(inp.detach(), dim=-1), reduction="batchmean"))


def mse_criterion(inp, target):
    """mt_dnn/loss.py MseCriterion (alpha 1, no sample weight)."""
    return F.mse_loss(inp.squeeze(), target)


def norm_inf_token(x, eps):
    """_norm_grad, norm_p "inf", token level (norm_level 0)."""
    return x / (x.abs().max(-1, keepdim=True)[0] + eps)


def smart_adv_loss(model, logits, ids, opts, ascent_reduce=False):
    """SmartPerturbation.forward; ascent_reduce=True is the (non-official)
    batch-mean alternative, used only to show that the choice matters."""
    regression = opts["regression"]
    embed_shape = model.embedding(ids).shape  # fwd_type 1: no random draws here
    noise = torch.empty(embed_shape, dtype=torch.float64).normal_(0, 1) * opts["noise_var"]
    noise.requires_grad_()
    for _ in range(opts["steps"]):
        adv_logits = model(ids, delta=noise)
        if regression:
            adv = F.mse_loss(adv_logits, logits.detach(),
                             reduction="mean" if ascent_reduce else "sum")
        else:
            adv = stable_kl(adv_logits, logits.detach(), reduce=ascent_reduce)
        (g,) = torch.autograd.grad(adv, noise)
        n = g.norm()
        if torch.isnan(n) or torch.isinf(n):
            # official: `return 0`, which then fails to unpack in
            # MTDNNModel.update; never reached in these cases.
            raise RuntimeError("nan/inf ascent gradient")
        noise = norm_inf_token(noise + g * opts["alpha"], opts["norm_eps"]).detach()
        noise.requires_grad_()
    adv_logits = model(ids, delta=noise)
    if regression:
        return mse_criterion(logits, adv_logits)
    return sym_kl_criterion(logits, adv_logits)


def run(opts, seed, ascent_reduce=False):
    classes = 1 if opts["regression"] else common.C

    def step(model, opt, ids, _mask, y):
        logits = model(ids)
        loss = common.task_loss(logits, y)  # CeCriterion / MseCriterion
        adv = smart_adv_loss(model, logits, ids, opts, ascent_reduce)
        loss = loss + opts["weight"] * adv
        loss.backward()
        opt.step()
        opt.zero_grad()
    init, after = common.train(step, seed, classes=classes)
    return init, after, classes


NOTE = ("mt-dnn SMART: noise ~ N(0,1)*noise_var of shape [B,L,H], unmasked; "
        "K ascent steps on stable_kl(adv, clean.detach(), reduce=False) (sum over the "
        "batch; MSE with reduction='sum' for regression); noise = (noise + alpha*grad) / "
        "(max_h|.| + norm_eps) per token (norm_p inf, norm_level 0); final "
        "SymKlCriterion(clean, adv) (clean not detached; MseCriterion for regression); "
        "loss = task + weight*adv, one backward, one SGD step. Fresh dropout masks in "
        "program order: clean pass, noise draw (normal_), K ascent passes, final pass. "
        "float64 throughout: the official .float()/float32 casts in stable_kl and "
        "SymKlCriterion are dropped. stable_kl's own epsilon is the hard-coded 1e-6.")

CASES = [
    ("smart_k1", dict(steps=1, alpha=1.0, noise_var=1e-5, norm_eps=1e-6,
                      weight=1.0, regression=False), 101),
    ("smart_k2", dict(steps=2, alpha=2.0, noise_var=1e-5, norm_eps=1e-6,
                      weight=0.5, regression=False), 102),
    ("smart_k1_noise", dict(steps=1, alpha=1.0, noise_var=0.1, norm_eps=1e-6,
                            weight=1.0, regression=False), 103),
    ("smart_regression_k1", dict(steps=1, alpha=1.0, noise_var=1e-5, norm_eps=1e-6,
                                 weight=1.0, regression=True), 104),
]


def main():
    cases = []
    for name, opts, seed in CASES:
        init, after, classes = run(opts, seed)
        _, after_mean, _ = run(opts, seed, ascent_reduce=True)
        moved = common.max_diff([init] + after[:-1], after)
        print(f"{name}: max param change per step {moved:.3e}; "
              f"sum-vs-mean ascent difference {common.max_diff(after, after_mean):.3e}")
        cases.append(common.case(
            name, "SMART", "examples", opts, init, seed, [0, 1, 2], after,
            share_dropout_mask=False, classes=classes,
            note=NOTE + (" Regression: output [B] here; mt-dnn's head gives [B,1], and "
                         "MseCriterion(logits, adv_logits) = mse_loss(logits.squeeze() [B], "
                         "adv_logits [B,1]) would broadcast to [B,B] there; this replay "
                         "uses the elementwise [B] vs [B] mean that the code computes "
                         "when both outputs are [B]." if opts["regression"] else "")))
    common.write("smart_mtdnn.json",
                 "namisan/mt-dnn mt_dnn/perturbation.py, mt_dnn/loss.py", cases)


if __name__ == "__main__":
    main()

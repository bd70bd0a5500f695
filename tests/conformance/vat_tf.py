"""Conformance replay: VAT (virtual adversarial training) as implemented in
tensorflow/models research/adversarial_text.

Followed (public code index; line numbers counted by hand, +-2, in
adversarial_losses.py at commit 6ddfb3f9 of tensorflow/models; the newer
stored version 88dbb09d has the same virtual_adversarial_loss body plus a
`single_label` gather of the eos weights):

  research/adversarial_text/adversarial_losses.py
    l.29-37  flags: perturb_norm_length = 5.0 (epsilon), num_power_iteration
             = 1, small_constant_for_finite_diff = 1e-1 (xi);
    l.46-47  adv_reg_coeff = 1.0 (weight).
    l.68-115 virtual_adversarial_loss(logits, embedded, inputs,
             logits_from_embedding_fn):
      l.88   logits = tf.stop_gradient(logits)        (q's logits: no gradient)
      l.91   weights = inputs.eos_weights              (KL at the last step only)
      l.96   d = tf.random_normal(shape(embedded))     (NOT masked here)
      l.102  for _ in xrange(FLAGS.num_power_iteration):   (a plain Python
             loop: num_power_iteration = 0 is allowed and skips it)
      l.103-104  d = _scale_l2(_mask_by_length(d, length), xi)
                 (the mask is applied INSIDE the loop, before each scaling)
      l.105  d_logits = logits_from_embedding_fn(embedded + d)
      l.106  kl = _kl_divergence_with_logits(logits, d_logits, weights)
      l.107-111  d = stop_gradient(tf.gradients(kl, d))   (gradient w.r.t. the
                 scaled d; no parameter gradient is kept from this pass)
      l.113  perturb = _scale_l2(d, perturb_norm_length)  (NOT masked again:
             the last gradient is scaled as is; with 0 iterations the raw,
             unmasked normal draw is scaled)
      l.114-115  vadv_logits = logits_from_embedding_fn(embedded + perturb);
             return _kl_divergence_with_logits(logits, vadv_logits, weights)
    l.170-178 _mask_by_length: tf.sequence_mask(length - 1): keeps positions
             0 .. length-2, i.e. the real tokens minus the final 'eos'.
    l.181-190 _scale_l2: alpha = reduce_max(|x|, (1, 2)) + 1e-12;
             l2 = alpha * sqrt(reduce_sum((x / alpha)^2, (1, 2)) + 1e-6);
             return norm_length * x / l2        (per example, over [L, H]).
    l.193-226 _kl_divergence_with_logits(q_logits, p_logits, weights):
             num_classes == 2: a sigmoid (Bernoulli) KL on [N] logits;
             else (softmax): kl = sum(q * (log_softmax(q_logits) -
             log_softmax(p_logits)), -1), q = softmax(q_logits);
             loss = sum(weights * kl) / sum(weights) (1 if the sum is 0).
             The eos weights are 1 once per sequence: a batch mean.
  research/adversarial_text/graphs.py (VatxtModel):
    classifier_graph: embedded = embedding(cl tokens); the task pass
      cl_loss_from_embedding -> logits, loss (layers.classification_loss:
      sparse softmax cross-entropy, weighted mean over the eos weights = batch
      mean); then adv_loss = adversarial_loss() * adv_reg_coeff;
      total_loss = loss + adv_loss.
    adversarial_loss / virtual_adversarial_loss: VAT runs on the language-model
      (unlabeled) batch `lm_inputs`: lm_embedded = embedding(lm tokens), a
      SEPARATE clean pass lm_cl_logits = logits_from_embedding(lm_embedded)
      (the q logits, stop-gradient inside), then
      adv_lib.virtual_adversarial_loss(lm_cl_logits, lm_embedded, ...).
      Graph order: task pass, VAT clean pass, normal draw, power passes,
      final pass.
    num_classes flag default 2 (IMDB); our model has C = 3 classes, so the
    softmax branch of _kl_divergence_with_logits applies.
  research/adversarial_text/layers.py:
    Embedding.call: dropout (keep_prob_emb; 0.5 in the README's VAT command)
      on the lookup output, noise_shape (B, 1, H); LSTM / cl_logits dropouts
      (default keep_prob 1.0); optimize(): Adam, non-embedding grads clipped
      to max_grad_norm, EMA of the variables.

Protocol replayed per step (names as advtrain: epsilon = perturb_norm_length,
xi = small_constant_for_finite_diff, power_iterations = num_power_iteration,
weight = adv_reg_coeff):
  logits = model(ids); task = cross_entropy(logits, y)          (batch mean)
  q_logits = model(ids).detach()     (SEPARATE_CLEAN_PASS, as graphs.py does)
  d = randn(B, L, H)                 (float64)
  repeat power_iterations: d = scale(d * mask, xi); kl = KL(q || p(E + d))
      (batch mean, softmax); d = grad(kl, d)  (stop-gradient)
  r = scale(d, epsilon)              (no mask; with 0 iterations r is the
                                      scaled, UNMASKED normal draw)
  loss = task + weight * KL(q || p(E + r)); backward; SGD step; zero_grad.

Adaptations (see README.md here):
  * embedded = the embedding lookup output; embedded + d is passed as
    Model.forward(ids, delta=d) (the final pass's gradient reaches the
    embedding table as in the official code, where lm_embedded is not
    stopped).
  * one batch: the official VAT term uses the unlabeled LM batch; here the
    VAT batch is the labeled batch itself.  The separate VAT clean pass is
    kept (SEPARATE_CLEAN_PASS = True); the script prints what reusing the task
    pass's logits for q would change.
  * the mask: `ids != 0` (all real tokens).  The official mask drops the last
    real token too (length - 1, the 'eos' of its data); these batches have no
    eos token.
  * dropout: the official model (README command) has only embedding dropout,
    applied to the lookup output BEFORE d is added, and lm_embedded is
    computed once, so the VAT clean pass and all perturbed passes share one
    mask (and d is never dropped), while the task pass has its own.  This
    model's only dropout is on E + delta; here every forward draws fresh
    masks in program order: task pass, VAT clean pass, the normal draw,
    the power-iteration passes, the final pass.  share_dropout_mask = False.
  * random numbers: TensorFlow's random ops have per-op streams; the
    replay draws from torch's default generator in graph-construction order.
    The normal draw is float64 (tf.random_normal is float32).
  * float64; Adam + clipping + learning-rate decay + EMA -> plain SGD.
This script is written from a reading of the official code, not copied.
"""

import torch
import torch.nn.functional as F

import common

# graphs.py computes q from its own clean pass (the LM batch's); False would
# reuse the task pass's logits instead (one forward fewer).
SEPARATE_CLEAN_PASS = True


def scale_l2(x, norm_length):
    """adversarial_losses.py _scale_l2, per example over dims (1, 2)."""
    alpha = x.abs().amax(dim=(1, 2), keepdim=True) + 1e-12
    l2 = alpha * torch.sqrt((x / alpha).pow(2).sum(dim=(1, 2), keepdim=True) + 1e-6)
    return norm_length * (x / l2)


def kl_with_logits(q_logits, p_logits):
    """_kl_divergence_with_logits, softmax branch (C = 3), eos weights all 1:
    sum over the batch / B."""
    q = F.softmax(q_logits, -1)
    kl = (q * (F.log_softmax(q_logits, -1) - F.log_softmax(p_logits, -1))).sum(-1)
    return kl.sum() / kl.shape[0]


def run(opts, seed, separate_clean_pass=SEPARATE_CLEAN_PASS, mask_at_draw=False,
        weight=None):
    weight = opts["weight"] if weight is None else weight

    def step(model, opt, ids, mask, y):
        logits = model(ids)
        task = common.task_loss(logits, y)
        q_logits = (model(ids) if separate_clean_pass else logits).detach()
        m = mask.unsqueeze(-1)
        shape = (ids.shape[0], ids.shape[1], common.H)
        d = torch.randn(shape, dtype=torch.float64)
        if mask_at_draw:  # not official: only to show that it matters (K = 0)
            d = d * m
        for _ in range(opts["power_iterations"]):
            d = scale_l2(d * m, opts["xi"]).detach().requires_grad_()
            kl = kl_with_logits(q_logits, model(ids, delta=d))
            (d,) = torch.autograd.grad(kl, d)
            d = d.detach()
        r = scale_l2(d, opts["epsilon"])
        loss = task + weight * kl_with_logits(q_logits, model(ids, delta=r))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return common.train(step, seed)


NOTE = ("tensorflow/models adversarial_text VAT: task pass -> CE (batch mean); a separate "
        "clean pass gives q's logits (stop-gradient; graphs.py's VAT clean pass, here on "
        "the same batch); d ~ N(0,1) [B,L,H] float64; power_iterations times: d = "
        "_scale_l2(d * mask, xi) (mask = real tokens, applied inside the loop), KL(q || "
        "p(E+d)) softmax, batch mean, d = its gradient (stop-gradient); r = _scale_l2(d, "
        "epsilon) with no further mask (power_iterations 0: the raw unmasked draw); loss = "
        "task + weight * KL(q || p(E+r)); one backward, one SGD step. _scale_l2: a = "
        "max|x| over [L,H] + 1e-12, l2 = a*sqrt(sum((x/a)^2) + 1e-6), x*n/l2. Fresh "
        "dropout masks in program order: task pass, VAT clean pass, normal draw, power "
        "passes, final pass. Official differences: eos excluded from the mask (no eos "
        "here), VAT on the unlabeled LM batch, embedding dropout before +d shared by the "
        "VAT passes, float32, Adam/clipping/EMA.")

# `unlabeled`: the official protocol, q from its own clean pass on the VAT
# batch; advtrain runs it as Trainer::step(forward, loss_fn, unlabeled) with
# the unlabeled forward on the same batch.  The last case is advtrain's
# one-batch step (Trainer::step(forward, loss_fn)), which takes q from the
# task pass's logits: not the official protocol, replayed here with the
# official code's every other detail.
CASES = [
    ("vat_defaults", dict(epsilon=5.0, xi=0.1, power_iterations=1, weight=1.0,
                          unlabeled=True), 201),
    ("vat_k2", dict(epsilon=1.0, xi=1e-2, power_iterations=2, weight=0.5,
                    unlabeled=True), 202),
    ("vat_k0", dict(epsilon=2.0, xi=0.1, power_iterations=0, weight=1.0,
                    unlabeled=True), 203),
    ("vat_one_batch", dict(epsilon=5.0, xi=0.1, power_iterations=1, weight=1.0,
                           unlabeled=False), 204),
]


def main():
    cases = []
    for name, opts, seed in CASES:
        init, after = run(opts, seed, separate_clean_pass=opts["unlabeled"])
        _, after_w0 = run(opts, seed, weight=0.0)
        _, after_reuse = run(opts, seed, separate_clean_pass=False)
        moved = common.max_diff([init] + after[:-1], after)
        line = (f"{name}: max param change per step {moved:.3e}; "
                f"weight 0 vs {opts['weight']}: {common.max_diff(after, after_w0):.3e}")
        if opts["unlabeled"]:
            line += f"; reuse task logits for q: {common.max_diff(after, after_reuse):.3e}"
        if opts["power_iterations"] == 0:
            _, after_masked = run(opts, seed, mask_at_draw=True)
            line += f"; mask the draw: {common.max_diff(after, after_masked):.3e}"
        print(line)
        cases.append(common.case(
            name, "VAT", "examples", opts, init, seed, [0, 1, 2], after,
            share_dropout_mask=False, note=NOTE))
    common.write("vat_tf.json",
                 "tensorflow/models research/adversarial_text/adversarial_losses.py "
                 "(virtual_adversarial_loss), graphs.py", cases)


if __name__ == "__main__":
    main()

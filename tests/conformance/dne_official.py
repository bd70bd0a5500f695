"""Conformance replay: DNE as implemented in dugu9sword/dne.

Followed (public code index; line numbers approximate):

  awesome_glue/weighted_embedding.py, WeightedEmbedding.forward (the hull
  version):
      nbr_tokens, _coeff = hull.get_nbr_and_coeff(tokens.view(-1))
      embedded = embedding(nbr_tokens, self.weight, padding_idx, ...)
                                              (candidates WITH gradient)
      not adv_mode: coeff_logit = (_coeff + 1e-6).log()
      adv_mode:     last_fw, last_bw = read_var_hook("coeff_logit")
                    coeff_logit = last_fw + step * last_bw
                                  / (torch.norm(last_bw, dim=-1, keepdim=True)
                                     + 1e-6)
      coeff_logit = coeff_logit - coeff_logit.max(1, keepdim=True)[0]
      coeff_logit.requires_grad_()            (a leaf; the hook keeps its
                                               detached value and its grad)
      coeff = F.softmax(coeff_logit, dim=1)
      embedded = (embedded * coeff.unsqueeze(-1)).sum(-2)
  awesome_glue/weighted_util.py: Dirichlet rows, alphas = [alpha] * v0 +
      [alpha * decay] * (n - v0) over a token's n neighbours, v0 = 1 + its
      first-order count; the word itself is the first neighbour; rows padded
      with 0 coefficients.
  allennlpx/training/adv_trainer.py, DoItYourselfPolicy(adv_iter=3, step=10):
      optimizer.zero_grad(); loss = batch_loss(batch); loss.backward()
      set_adv_mode(True)
      for k in range(adv_iter): send("step", step)
          loss = batch_loss(batch) / adv_iter; loss.backward()
      set_adv_mode(False); optimizer.step()
      (enable_gradient_clipping(model, grad_clipping): a hook on every
      parameter clamps each backward's gradient to [-g, g]; case
      dne_clamped replays it.)
  allennlpx/predictors/predictor.py: each instance repeated pred_ensemble
      times, probs_e = softmax(logits_e), w_e = sum_c (max p_e - p_e,c)^3,
      w /= sum(w), p = w @ probs.
  awesome_glue/config.py nbr_2nd = '21' with awesome_glue/task.py: the
      second-order hull (DecayAlphaHull) for training, the first-order one
      (SameAlphaHull: alpha for every neighbour) for prediction and attack.

Order of the default generator per step: the Dirichlet draws of the clean
pass's lookup (torch._standard_gamma over [B, L, S] float64, invalid
candidates drawn with concentration 1 and zeroed), the clean pass's dropout
mask, the masks of the K passes (fresh masks at every forward).

Adaptations (see README.md here):
  * the Dirichlet points are independent draws of the default generator
    (float64 gamma draws, normalized); the official code draws 10,000 rows
    per neighbourhood size with numpy once and walks them by a random
    offset.  The draw is of the same distribution; the replay draws it as
    advtrain does so that the numbers line up.
  * the neighbourhoods come from advtrain's table (the token first, its
    substitutes, then theirs; invalid candidates repeat the token, the
    official ones are id 0); the batch's S is its largest neighbourhood, as
    the official code cuts it.
  * the model is common.py's; the outer optimizer is plain SGD (the
    official DenseSparseAdam); float64 throughout.
  * the ensemble draws its members one after the other (the official code
    repeats each instance in one batch), from the first-order columns of the
    same table (alpha for all; the second-order columns drawn at 1 and
    zeroed like invalid ones, their logits -inf: no weight).
This script is written from a reading of the official code, not copied.
"""

import torch
import torch.nn.functional as F

import common

# Each id's substitutes (token 0 pads and has none).
SUBSTITUTES = {1: [2, 3], 2: [1, 4], 3: [1], 4: [6], 5: [6], 6: [5]}
S = 5


def table():
    """[V, S] neighbourhoods (the token, its substitutes, theirs), mask and
    first-order counts, as advtrain's SubstitutionTable.second_order."""
    ids, mask, first = [], [], []
    for i in range(common.V):
        row = [i]
        for j in SUBSTITUTES.get(i, []):
            if j not in row and len(row) < S:
                row.append(j)
        first.append(len(row))
        for j in list(row[1:]):
            for k in SUBSTITUTES.get(j, []):
                if k not in row and len(row) < S:
                    row.append(k)
        ids.append(row + [i] * (S - len(row)))
        mask.append([1] * len(row) + [0] * (S - len(row)))
    return ids, mask, first


CAND_IDS, CAND_MASK, FIRST = (torch.tensor(t) for t in table())


def draw_logits(ids, alpha, decay, first_order_only=False):
    """The clean pass's coefficient logits [B, L, S]: log(c + 1e-6) - max,
    c ~ Dirichlet over the valid candidates (for prediction: over the first
    order, alpha for all, the other logits -inf)."""
    valid = CAND_MASK[ids].bool()
    first = FIRST[ids]
    col = torch.arange(S).expand(valid.shape)
    second = col >= first.unsqueeze(-1)
    if first_order_only:
        valid = valid & ~second
    a = torch.where(second,
                    torch.tensor(alpha * decay, dtype=torch.float64),
                    torch.tensor(alpha, dtype=torch.float64))
    a = a.masked_fill(~valid, 1.0)
    g = torch._standard_gamma(a).masked_fill(~valid, 0.0)
    c = g / g.sum(-1, keepdim=True)
    z = (c + 1e-6).log()
    z = z - z.max(-1, keepdim=True)[0]
    if first_order_only:
        z = z.masked_fill(second, float("-inf"))
    return z


def forward_at(model, ids, z):
    """WeightedEmbedding.forward with the logits z, then the model."""
    E = model.embedding(CAND_IDS[ids])                  # [B, L, S, H]
    coeff = F.softmax(z, dim=-1)
    embedded = (E * coeff.unsqueeze(-1)).sum(-2)
    return model.rest(model.first(embedded), ids.ne(0))


def run(opts, seed, clamp=None):
    def step(model, opt, ids, _mask, y):
        if clamp is not None and not hasattr(model, "_clamped"):
            for p in model.parameters():
                p.register_hook(lambda g: g.clamp(-clamp, clamp))
            model._clamped = True
        opt.zero_grad()
        z = draw_logits(ids, opts["alpha"], opts["decay"]).requires_grad_()
        loss = F.cross_entropy(forward_at(model, ids, z), y)
        loss.backward()
        for _ in range(opts["steps"]):
            g = z.grad
            z = z.detach() + opts["step_size"] * g / (
                torch.norm(g, dim=-1, keepdim=True) + 1e-6)
            z = (z - z.max(-1, keepdim=True)[0]).detach().requires_grad_()
            loss = F.cross_entropy(forward_at(model, ids, z), y) / opts["steps"]
            loss.backward()
        opt.step()
        opt.zero_grad()
    return common.train(step, seed)


def ensemble(opts, after, batch, members, seed):
    """predictor.py's weighted ensemble over `members` drawn points, the
    model in eval() with the parameters `after`."""
    model = common.make_model()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.tensor(after[n], dtype=torch.float64))
    model.eval()
    ids, _, _ = common.batch(batch)
    torch.manual_seed(seed)
    probs = []
    with torch.no_grad():
        for _ in range(members):
            z = draw_logits(ids, opts["alpha"], opts["decay"],
                            first_order_only=True)
            probs.append(F.softmax(forward_at(model, ids, z), dim=1))
    probs = torch.stack(probs, 1)                        # [B, M, C]
    w = (probs.max(-1, keepdim=True)[0] - probs).pow(3).sum(-1)   # [B, M]
    w = w / w.sum(-1, keepdim=True)
    return (w.unsqueeze(1) @ probs).squeeze(1)           # [B, C]


NOTE = ("dugu9sword/dne WeightedEmbedding.forward + DoItYourselfPolicy: "
        "clean pass at z0 = log(c + 1e-6) - max, c ~ Dir(alpha for the token "
        "and its substitutes, alpha * decay after; torch._standard_gamma "
        "float64 over [B, L, S], invalid drawn at 1 and zeroed); K passes at "
        "z_k = z_{k-1} + step_size * g / (||g||_S + 1e-6) - max, g the grad of "
        "the previous pass's logits; losses CE, CE/K, ..., candidates with "
        "gradient. Fresh dropout masks at every pass. Neighbourhoods in "
        "advtrain's order (token, substitutes, theirs).")

DEFAULTS = dict(alpha=1.0, decay=0.5, steps=3, step_size=10.0)
CASES = [
    ("dne_defaults", DEFAULTS, 501, None),
    ("dne_small_alpha", dict(DEFAULTS, alpha=0.1, decay=0.05, steps=2,
                             step_size=1.0), 502, None),
    ("dne_clamped", DEFAULTS, 503, 0.05),
]


def main():
    cases = []
    for name, opts, seed, clamp in CASES:
        init, after = run(opts, seed, clamp)
        _, unclamped = run(opts, seed)
        moved = common.max_diff([init] + after[:-1], after)
        print(f"{name}: max param change per step {moved:.3e}"
              + (f"; the clamp changes it by {common.max_diff(after, unclamped):.3e}"
                 if clamp is not None else ""))
        c = common.case(name, "DNE", "examples", opts, init, seed, [0, 1, 2],
                        after, share_dropout_mask=False, note=NOTE)
        ids, mask, first = table()
        c["substitutes"] = {"ids": ids, "mask": mask, "first_order": first}
        if clamp is not None:
            c["clamp_gradients"] = clamp
        members, batch, pseed = 4, 2, seed + 100
        c["ensemble"] = {"batch": batch, "members": members, "seed": pseed,
                         "probs": ensemble(opts, after[-1], batch, members,
                                           pseed).tolist()}
        cases.append(c)
    common.write("dne_official.json",
                 "dugu9sword/dne awesome_glue/weighted_embedding.py, "
                 "weighted_util.py, allennlpx/training/adv_trainer.py "
                 "(DoItYourselfPolicy), allennlpx/predictors/predictor.py",
                 cases)


if __name__ == "__main__":
    main()

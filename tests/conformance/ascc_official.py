"""Conformance replay: ASCC as implemented in dongxinshuai/ASCC.

Followed (public code index, dongxinshuai/ASCC commit e49a93b0; line
numbers approximate):

  models/BaseModelAdv.py, get_adv_by_convex_syn (l.300-400):
      w = torch.empty(B, L, S, 1).to(device).to(embd.dtype)
      nn.init.kaiming_normal_(w)            (a = 0, fan_in = L*S, gain sqrt 2)
      w.requires_grad_()
      optimizer = utils.getOptimizer([w], name='adam', lr=w_optm_lr,
                                     weight_decay=2e-5)  (torch.optim.Adam)
      ww = w * valid + 500 * (valid - 1)    (invalid candidates at -500)
      comb(p) = (p * syn.detach()).sum(-2)  (candidates detached)
      embd_ori = embd.detach(); logit_ori = embd_to_logit(embd_ori)
                                            (without grad)
      K times: optimizer.zero_grad(); ww = ...;
          embd_adv = comb(softmax(ww, -2)); logit_adv = embd_to_logit(embd_adv)
          loss = -KLDivLoss(sum)(log_softmax(logit_adv, 1),
                                 softmax(logit_ori.detach(), 1))
          loss = loss + sparse_weight * (-softmax(ww, -2)
                                         * log_softmax(ww, -2)).sum(-2).mean()
          loss.backward(); optimizer.step()
      comb_p = softmax(ww(w), -2), returned detached (out_type "comb_p").
      The search runs in train() for the BiLSTM (eval_adv_mode False), as
      here; the CNN searches in eval().
  train_imdb_ascc.py (l.165-235), pert_set "ad_text_syn_p":
      embd = text_to_embd(text); syn = text_to_embd(text_like_syn) [B,L,S,H]
      comb_p = get_adv_by_convex_syn(embd, y, syn, valid, ...)
      optimizer.zero_grad()
      predicted = text_to_logit(text); loss_clean = cross_entropy (mean)
      predicted_adv = text_syn_p_to_logit(text_like_syn, comb_p)
          (candidate embeddings recomputed WITH gradient, (comb_p * E).sum(-2))
      loss_adv = cross_entropy(predicted_adv, y)
      loss_kl = (1.0 / bs) * KLDivLoss(sum)(log_softmax(predicted_adv, 1),
                                            softmax(predicted, 1))
                                            (clean NOT detached)
      loss = weight_kl * kl_control * loss_kl + weight_adv * loss_adv
             + weight_clean * loss_clean;  loss.backward(); optimizer.step()
  opts.py / train_imdb.sh: train_attack_iters 10, w_optm_lr 10,
      train_attack_sparse_weight 15, weight_adv 0, --weight_clean 1,
      --weight_kl 4, kl_control 1 from epoch 0.

Order of the default generator per step: the Kaiming draw of w, the masks
of the search's clean pass, of its K passes, of the clean pass, of the pass
at the combination (fresh masks at every forward).

Adaptations (see README.md here):
  * the candidates list each token FIRST, then its substitutes, and repeat
    the token where a candidate is invalid (advtrain's SubstitutionTable);
    the official dataHelper lists the token LAST and pads with id 0.  The
    replay runs the official protocol on advtrain's table; the script prints
    what the official order would change (the same protocol, other numbers:
    the i.i.d. Kaiming draws fall on other candidates).
  * the model's embedding has no linear 300->100 after it; the combination
    is taken of the lookup output (with one, the same: the weights sum to 1).
  * Adam (lr 5e-4, weight decay 2e-4) with a warm-up schedule -> plain SGD
    for the outer optimizer; the inner Adam is kept exactly.
  * float64 throughout (the official code runs float32; -500 gives exp
    7e-218 here instead of 0).
This script is written from a reading of the official code, not copied.
"""

import torch
import torch.nn.functional as F

import common

# Each id's substitutes (token 0 pads and has none).
SUBSTITUTES = {1: [2, 3], 2: [1, 4, 5], 3: [1], 4: [], 5: [6, 2], 6: [5]}
S = 4


def table(token_last=False):
    """[V, S] candidate ids and mask: advtrain's order (the token first,
    invalid slots repeat it), or the official one (token last, id 0 pads)."""
    ids, mask = [], []
    for i in range(common.V):
        subs = SUBSTITUTES.get(i, [])[: S - 1]
        if token_last:
            row = subs + [i]
            ids.append(row + [0] * (S - len(row)))
        else:
            row = [i] + subs
            ids.append(row + [i] * (S - len(row)))
        mask.append([1] * len(row) + [0] * (S - len(row)))
    return ids, mask


def run(opts, seed, token_last=False, detach_final=False):
    cand_ids, cand_mask = table(token_last)
    cand_ids = torch.tensor(cand_ids, dtype=torch.long)
    cand_mask = torch.tensor(cand_mask, dtype=torch.float32)

    def step(model, opt, ids, _mask, y):
        pad_mask = ids.ne(0)
        B, L = ids.shape
        text_like_syn = cand_ids[ids]                 # [B, L, S]
        valid = cand_mask[ids]                        # float32, as the official
        embd = model.embedding(ids)
        syn = model.embedding(text_like_syn.reshape(B, L * S)).reshape(B, L, S, -1)

        def embd_to_logit(e):
            return model.rest(model.first(e), pad_mask)

        # get_adv_by_convex_syn
        w = torch.empty(B, L, S, 1).to(embd.dtype)
        torch.nn.init.kaiming_normal_(w)
        w.requires_grad_()
        adam = torch.optim.Adam([w], lr=opts["search_lr"],
                                weight_decay=opts["search_weight_decay"])
        v = valid.reshape(B, L, S, 1)

        def ww_of(w_):
            return w_ * v + 500 * (v - 1)

        embd_ori = embd.detach()
        with torch.no_grad():
            logit_ori = embd_to_logit(embd_ori)
        for _ in range(opts["steps"]):
            adam.zero_grad()
            ww = ww_of(w)
            embd_adv = (F.softmax(ww, -2) * syn.detach()).sum(-2)
            logit_adv = embd_to_logit(embd_adv)
            loss = -torch.nn.KLDivLoss(reduction="sum")(
                F.log_softmax(logit_adv, dim=1), F.softmax(logit_ori.detach(), dim=1))
            if opts["entropy_weight"] != 0:
                loss = loss + opts["entropy_weight"] * (
                    -F.softmax(ww, -2) * F.log_softmax(ww, -2)).sum(-2).mean()
            loss.backward()
            adam.step()
        comb_p = F.softmax(ww_of(w), -2).detach()

        # the training step
        opt.zero_grad()
        predicted = model(ids)
        loss_clean = F.cross_entropy(predicted, y)
        E = model.embedding(text_like_syn.reshape(B, L * S)).reshape(B, L, S, -1)
        if detach_final:  # not official: what the gradient through E carries
            E = E.detach()
        predicted_adv = embd_to_logit((comb_p * E).sum(-2))
        loss_adv = F.cross_entropy(predicted_adv, y)
        loss_kl = (1.0 / B) * torch.nn.KLDivLoss(reduction="sum")(
            F.log_softmax(predicted_adv, dim=1), F.softmax(predicted, dim=1))
        loss = (opts["kl_weight"] * 1 * loss_kl + opts["adv_weight"] * loss_adv
                + opts["clean_weight"] * loss_clean)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return common.train(step, seed)


NOTE = ("dongxinshuai/ASCC get_adv_by_convex_syn + train_imdb_ascc.py: w [B,L,S,1] "
        "kaiming_normal_ (fan_in L*S) drawn first; ww = w*valid + 500*(valid-1); "
        "p_clean from a no-grad pass at the detached lookup; K steps of "
        "torch.optim.Adam([w], lr, weight_decay) on -KL_sum(log_softmax(adv) || "
        "softmax(clean)) + entropy_weight * mean entropy, candidates detached; "
        "p = softmax(ww) detached; loss = kl_weight * (1/B) KL_sum(log_softmax(adv), "
        "softmax(clean)) + adv_weight * CE(adv) + clean_weight * CE(clean), clean not "
        "detached, candidates' embeddings recomputed with gradient. Fresh dropout masks "
        "at every pass. Candidates in advtrain's order (token first; the official "
        "lists it last).")

DEFAULTS = dict(steps=10, search_lr=10.0, search_weight_decay=2e-5,
                entropy_weight=15.0, clean_weight=1.0, adv_weight=0.0,
                kl_weight=4.0)
CASES = [
    ("ascc_defaults", DEFAULTS, 401),
    ("ascc_soft_search", dict(DEFAULTS, steps=3, search_lr=0.5, entropy_weight=0.0,
                              adv_weight=1.0, kl_weight=1.0), 402),
]


def main():
    cases = []
    for name, opts, seed in CASES:
        init, after = run(opts, seed)
        _, after_last = run(opts, seed, token_last=True)
        _, after_detached = run(opts, seed, detach_final=True)
        moved = common.max_diff([init] + after[:-1], after)
        print(f"{name}: max param change per step {moved:.3e}; "
              f"official order (token last): {common.max_diff(after, after_last):.3e}; "
              f"candidates detached in the final pass: "
              f"{common.max_diff(after, after_detached):.3e}")
        c = common.case(name, "ASCC", "examples", opts, init, seed, [0, 1, 2],
                        after, share_dropout_mask=False, note=NOTE)
        ids, mask = table()
        c["substitutes"] = {"ids": ids, "mask": mask}
        cases.append(c)
    common.write("ascc_official.json",
                 "dongxinshuai/ASCC models/BaseModelAdv.py (get_adv_by_convex_syn), "
                 "train_imdb_ascc.py", cases)


if __name__ == "__main__":
    main()

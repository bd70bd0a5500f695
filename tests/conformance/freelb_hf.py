"""Conformance replay: FreeLB as in the official HuggingFace example of
zhuchen03/FreeLB.

Followed (public code index, commits 2100e743 and d8c16951 hold the same
training loop):
  zhuchen03/FreeLB huggingface-transformers/examples/run_glue_freelb.py,
  function train(), the block between "# initialize delta" and
  "# ============================ End (2)" (about lines 223-306) and the
  optimizer step right after it (about lines 308-316):

    embeds_init = word_embeddings(input_ids)          # no random numbers
    if adv_init_mag > 0:                               # random start, drawn
        input_mask = attention_mask; lengths = sum(mask, 1)   # BEFORE the
        l2:   delta = U(-1, 1) * mask;                 # first forward pass
              delta = delta * adv_init_mag / sqrt(lengths * hidden)
        linf: delta = U(-adv_init_mag, adv_init_mag) * mask
    else: delta = zeros
    for astep in range(adv_steps):                     # K passes
        delta.requires_grad_(); forward(inputs_embeds = delta + embeds_init)
        loss = loss / adv_steps; loss.backward()       # grads accumulate
        if astep == adv_steps - 1: break               # no ascent after the last
        g = delta.grad
        l2:   denorm = clamp(||g_b||_2, min=1e-8); delta = delta + adv_lr*g/denorm
              if adv_max_norm > 0: per-example norm (computed in float32) and
              rescale examples whose norm exceeds adv_max_norm onto the sphere
        linf: denorm = clamp(||g_b||_inf, min=1e-8); delta = delta + adv_lr*g/denorm
              if adv_max_norm > 0: delta = clamp(delta, -adv_max_norm, adv_max_norm)
        embeds_init = word_embeddings(input_ids)       # recomputed, not detached
    clip_grad_norm_(max_grad_norm); optimizer.step(); scheduler.step();
    model.zero_grad()

  Note: the ascent step is NOT a sign step for linf (it divides by the
  per-example max |g|), the random start is not projected (a linf start of
  magnitude init_mag > adv_max_norm is used as is in pass 1), and after an
  ascent step delta is not re-masked by the attention mask (its gradient at
  padded positions is zero anyway).

Dropout masks (zhuchen03/FreeLB huggingface-transformers/src/transformers/
modeling_albert.py): the loop threads `dp_masks` through the model (the
first pass gets None and returns the masks it drew; later passes reuse
them), but only two dropouts honour it: the attention-probability dropout
in AlbertAttention.forward (mask1 = zeros_like(probs).bernoulli_(1-p)/(1-p)
when dp_mask is None) and the pooled-output dropout in
AlbertForSequenceClassification.forward.  The embedding-output dropout
(AlbertEmbeddings inherits BertEmbeddings, a plain nn.Dropout after the
LayerNorm) and the attention-output dropout (AlbertAttention.dropout,
nn.Dropout) draw FRESH masks at every pass.  This model's only dropout sits
on the embedding lookup output (+ delta), i.e. where the official model has
the fresh-mask embedding dropout, so the main cases use
share_dropout_mask=False: every pass draws a fresh mask from the default
generator in program order (random start first, then pass 1's mask, pass
2's mask, ...).  One extra case ("..._dpmask") applies the dp_masks
mechanism to this model's dropout instead (mask drawn in pass 1 with
bernoulli_, after the random start, and reused by passes 2..K without new
draws); the C++ side may use it to test share_dropout_mask=True.

Adaptations (see README.md here):
  * float64 throughout; the official l2 projection computes the norm in
    float32 (`.float()`), and the launch script runs --fp16: kept float64.
  * attention_mask = (ids != 0) (token 0 pads here).  The official adaptive
    sequence-length cut (batch truncated to the longest real length) is a
    no-op on these batches (each has a full-length example).
  * AdamW + linear warmup scheduler + clip_grad_norm_(max_grad_norm) are
    replaced by plain SGD(lr=common.LR) without clipping (the protocol under
    test is the adversarial part); gradient_accumulation_steps = 1, n_gpu 1.
  * The loss is the batch-mean cross-entropy (as the official ALBERT head).
This script is written from a reading of the code, not copied.
"""

import torch

import common


def random_start(emb, mask, norm, init_mag):
    """Random start drawn before the first forward pass."""
    if init_mag <= 0:
        return torch.zeros_like(emb)
    m = mask.unsqueeze(2)
    if norm == "l2":
        d = torch.zeros_like(emb).uniform_(-1, 1) * m
        dims = mask.sum(1) * emb.size(-1)
        return (d * (init_mag / torch.sqrt(dims)).view(-1, 1, 1)).detach()
    return torch.zeros_like(emb).uniform_(-init_mag, init_mag) * m


def ascend(delta, g, norm, alpha, eps, stats):
    b = g.size(0)
    if norm == "l2":
        denorm = torch.clamp(torch.norm(g.view(b, -1), dim=1).view(-1, 1, 1), min=1e-8)
        delta = (delta + alpha * g / denorm).detach()
        if eps > 0:
            # official: norm taken in float32; float64 here
            n = torch.norm(delta.view(b, -1), p=2, dim=1).detach()
            exceed = (n > eps).to(delta)
            stats["bound"] += int(exceed.sum().item())
            stats["checked"] += b
            delta = (delta * (eps / n * exceed + (1 - exceed)).view(-1, 1, 1)).detach()
    else:
        denorm = torch.clamp(torch.norm(g.view(b, -1), dim=1, p=float("inf")).view(-1, 1, 1),
                             min=1e-8)
        delta = (delta + alpha * g / denorm).detach()
        if eps > 0:
            clipped = (delta.abs() > eps).sum().item()
            stats["bound"] += int(clipped > 0)
            stats["clipped_elems"] += int(clipped)
            stats["checked"] += 1
            delta = torch.clamp(delta, -eps, eps).detach()
    return delta


def freelb_step(model, opt, ids, mask, y, norm, o, shared, stats):
    k = o["steps"]
    emb = model.embedding(ids)  # embeds_init (no random numbers drawn)
    delta = random_start(emb.detach(), mask, norm, o["init_mag"])
    dp = None
    for astep in range(k):
        delta.requires_grad_()
        if shared:
            # dp_masks mechanism applied to this model's dropout: drawn in
            # pass 1 (after the random start), reused without new draws.
            x = model.embedding(ids) + delta
            if dp is None:
                q = model.dropout
                dp = torch.zeros_like(x).bernoulli_(1 - q) / (1 - q)
            out = model.rest(torch.tanh(model.l1(dp * x)), ids.ne(0))
        else:
            out = model(ids, delta)  # fresh dropout mask every pass
        loss = common.task_loss(out, y) / k
        loss.backward()
        if astep == k - 1:
            break
        g = delta.grad.clone().detach()
        stats["delta_norms"].append(
            torch.norm(delta.detach().view(g.size(0), -1), dim=1).tolist())
        delta = ascend(delta.detach(), g, norm, o["alpha"], o["epsilon"], stats)
        stats["delta_norms_after"].append(
            torch.norm(delta.view(g.size(0), -1), dim=1).tolist()
            if norm == "l2" else delta.abs().amax(dim=(1, 2)).tolist())
    opt.step()
    model.zero_grad()


def run(norm, o, seed, shared, stats):
    def step(model, opt, ids, mask, y):
        freelb_step(model, opt, ids, mask, y, norm, o, shared, stats)
    return common.train(step, seed)


def check_dropout_equivalence():
    """F.dropout on CPU draws the same numbers as the official
    zeros_like(x).bernoulli_(1-p)/(1-p) mask and gives the same product."""
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    torch.manual_seed(7)
    a = torch.nn.functional.dropout(x, 0.25, True)
    ra = torch.rand(1).item()
    torch.manual_seed(7)
    m = torch.zeros_like(x).bernoulli_(0.75) / 0.75
    b = m * x
    rb = torch.rand(1).item()
    assert torch.equal(a, b) and ra == rb, "dropout draw mismatch"


COMMON_NOTE = (
    "zhuchen03/FreeLB huggingface-transformers/examples/run_glue_freelb.py train(): "
    "embeds_init = lookup; random start (if init_mag>0) drawn BEFORE pass 1 "
    "[l2: U(-1,1)*mask*init_mag/sqrt(len*H); linf: U(-init_mag,init_mag)*mask; not projected]; "
    "K passes, each backward of loss/K (grads accumulate); after passes 1..K-1: "
    "delta += alpha*g/clamp(||g_b||,1e-8) (l2 norm, or max-abs for linf: not a sign step), "
    "then projection if epsilon>0 (l2: rescale examples whose norm exceeds epsilon; "
    "linf: elementwise clamp); no ascent after pass K; SGD step; zero_grad. "
    "float64 (official l2 projection norm is float32 and runs use fp16). "
    "AdamW/scheduler/clip_grad_norm_ replaced by plain SGD. ")
FRESH_NOTE = (
    "Dropout: official dp_masks reuse covers only ALBERT's attention-prob and pooled-output "
    "dropouts; the embedding-output dropout (this model's dropout position) draws fresh "
    "masks each pass, so share_dropout_mask=False: random start, then pass 1 mask, pass 2 "
    "mask, ... from the default generator.")
SHARED_NOTE = (
    "Variant: the official dp_masks mechanism applied to this model's dropout: mask "
    "drawn once in pass 1 via zeros_like(x).bernoulli_(1-p)/(1-p) (same numbers as "
    "F.dropout), AFTER the random start, reused by passes 2..K with no new draws "
    "(share_dropout_mask=True).")


def main():
    check_dropout_equivalence()
    specs = [
        # name, method, norm, options, seed, shared
        ("l2_init0_eps0", "FreeLB", "l2",
         dict(alpha=0.3, steps=3, epsilon=0.0, init_mag=0.0), 401, False),
        ("l2_init0.6_eps0.3", "FreeLB", "l2",
         dict(alpha=0.05, steps=3, epsilon=0.3, init_mag=0.6), 402, False),
        ("linf_init0.2_eps0.15", "FreeLBLInf", "linf",
         dict(alpha=0.1, steps=3, epsilon=0.15, init_mag=0.2), 403, False),
        ("linf_init0_eps0", "FreeLBLInf", "linf",
         dict(alpha=0.1, steps=3, epsilon=0.0, init_mag=0.0), 404, False),
        ("l2_init0.6_eps0.3_dpmask", "FreeLB", "l2",
         dict(alpha=0.05, steps=3, epsilon=0.3, init_mag=0.6), 405, True),
    ]
    cases = []
    for name, method, norm, o, seed, shared in specs:
        stats = {"bound": 0, "checked": 0, "clipped_elems": 0,
                 "delta_norms": [], "delta_norms_after": []}
        init, after = run(norm, o, seed, shared, stats)
        moved = [max(abs(a - b) for k in init
                     for a, b in zip(torch.tensor(before[k]).flatten().tolist(),
                                     torch.tensor(now[k]).flatten().tolist()))
                 for before, now in zip([init] + after[:-1], after)]
        print(f"{name}: per-step max param change "
              + ", ".join(f"{m:.3e}" for m in moved))
        if o["epsilon"] > 0:
            if norm == "l2":
                print(f"  l2 projection bound for {stats['bound']} of "
                      f"{stats['checked']} example-ascents")
            else:
                print(f"  linf clamp bound in {stats['bound']} of {stats['checked']} "
                      f"ascents ({stats['clipped_elems']} elements clipped)")
        print("  delta size after each ascent (per example): "
              + "; ".join("[" + ", ".join(f"{v:.3f}" for v in r) + "]"
                          for r in stats["delta_norms_after"]))
        note = COMMON_NOTE + (SHARED_NOTE if shared else FRESH_NOTE)
        cases.append(common.case(name, method, "examples", o, init, seed, [0, 1, 2],
                                 after, share_dropout_mask=shared, note=note))
    common.write("freelb_hf.json",
                 "zhuchen03/FreeLB huggingface-transformers/examples/run_glue_freelb.py",
                 cases)


if __name__ == "__main__":
    main()

"""Conformance replay: YOPO as implemented in the fairseq (RoBERTa) part of
zhuchen03/FreeLB.

Followed (public code index, commit d8c16951):
  zhuchen03/FreeLB fairseq-RoBERTa/fairseq/tasks/sentence_prediction.py
    SentencePredictionTask.yopo_train_step (about lines 268-335) and
    SentencePredictionTask.yopo_inner_steps (about lines 250-265):

    if rand_init_mag > 0:
        embeds_init = embed_tokens(src_tokens)          # no random numbers
        input_mask = (src_tokens != pad)
        delta = U(-1, 1) * input_mask                   # drawn BEFORE pass 1,
        delta = delta * rand_init_mag / sqrt(src_lengths * hidden)   # so before
        loss = criterion(token_embed=delta + embeds_init,            # its dropout
                         init_dp=True, yopo=True)                     # mask
    else:
        delta = 0 (a Python int); loss = criterion(init_dp=True, yopo=True)
    loss = loss / (1 + adv_steps); backward               # full pass 0
    for t_adv in range(adv_steps):                        # m more full passes
        p = first_layer_out.grad                          # co-state of the LAST full pass
        const = embed_tokens(src_tokens).detach()
        delta = yopo_inner_steps(p, delta, const)         # n = yopo_steps inner steps
        loss = criterion(token_embed=delta + embed_tokens(src_tokens),
                         init_dp=no_sync_dp (default False), yopo=True)
        loss = loss / (1 + adv_steps); backward           # grads accumulate
    (trainer: grads * 1/sample_size, clip_grad_norm(clip_norm), optimizer.step())

    yopo_inner_steps, per inner step:
        H = Hamiltonian_fwd(p, token_embed=const + delta, init_dp=False)
          = sum(layers[0](dropout_mask1 * (embedding stack)) * p)
        g = autograd.grad(H, delta)                       # no parameter grads
        delta = delta + adv_lr * g / clamp(||g_b||_2, min=1e-10)
        if max_norm > 0: rescale examples whose l2 norm exceeds max_norm
                         (norm in the working dtype: no float32 cast here)

  So with adv_steps = m and yopo_steps = n a step makes 1 + m full passes,
  m blocks of n inner steps (none after the last full pass), every full pass
  backpropagates loss / (1 + m), the inner steps add no parameter gradient,
  and the co-state p is the first layer's output gradient of the scaled
  (1/(1+m)) summed loss.  The inner ascent is l2 only (no norm_method
  branch), with a denominator clamp of 1e-10 (the HF FreeLB and the linf
  branches use 1e-8).
  fairseq-RoBERTa/fairseq/trainer.py Trainer.train_step picks
  yopo_train_step only when --yopo-steps > 1.  Launch values
  (fairseq-RoBERTa/launch/YOPO/mrpc-fp32-clip.sh): adv_steps 3, yopo_steps 2,
  rand_init_mag 0.64, max_norm 0.4, adv_lr 1.33e-2, dropout 0.1, no
  --no-sync-dp ("yopo-syncdp" in the experiment name).

Dropout masks (fairseq-RoBERTa/fairseq/modules/transformer_sentence_encoder.py,
TransformerSentenceEncoder.forward and .Hamiltonian_fwd): the embedding
dropout is done by hand: `if init_dp: self.mask1 = zeros_like(x).bernoulli_(1-p)
/ (1-p)`; `x = self.mask1 * x`.  Full pass 0 runs with init_dp=True (draws
the mask), the inner steps run with init_dp=False and the later full passes
with init_dp=no_sync_dp=False: the stored mask is reused and NO new random
numbers are drawn.  Per step the default generator therefore advances by the
random start's uniform_ (if rand_init_mag > 0) followed by ONE bernoulli_
of the embedding shape.  Reproduced exactly here (share_dropout_mask True).
(The encoder layers also take init_dp and reuse their own masks; this model
has no such layers.)

Mapping onto the model: the official "first layer" output (first_layer_out,
the output of encoder layer 0 after embedding + dropout + padding zeroing)
is Model.first, z0 = tanh(l1(mask1 * (E + delta))); the rest of the network
(remaining layers, classification head) is Model.rest.

Adaptations (see README.md here):
  * float64 throughout; the official criterion takes log_softmax in float32
    (F.log_softmax(logits, dtype=torch.float32)), regression casts .float().
  * The official criterion sums the loss over the batch and the trainer
    divides the gradients by sample_size (= batch size) before the step, so
    the parameter update equals that of the batch-mean loss used here; the
    co-state p (and delta's gradient) is therefore 1/B of the official one,
    which only matters through the 1e-10 clamp.
  * init_mag 0: the official code sets delta = 0 (a Python int) and
    yopo_inner_steps then calls torch.autograd.grad(hal, 0), which fails;
    here delta starts as a zero tensor (the natural reading).
  * Pad token 0 (fairseq pads with 1); src_lengths = number of non-pad
    tokens; the official zeroing of padded positions before layer 0 is not
    reproduced (the masked mean already ignores them, so p and delta's
    gradient are zero there).
  * fairseq's Trainer._set_seed reseeds torch with args.seed + num_updates
    before every step; here torch.manual_seed(seed) is called once before
    the first step (the C++ test does the same).
  * Adam + polynomial LR schedule + clip_norm replaced by SGD(lr=common.LR).
This script is written from a reading of the code, not copied.
"""

import torch

import common


def full_pass(model, ids, mask, y, delta, dmask, scale):
    """One full forward/backward pass with the stored dropout mask."""
    x = model.embedding(ids) + delta
    z0 = torch.tanh(model.l1(dmask * x))
    z0.retain_grad()
    loss = common.task_loss(model.rest(z0, ids.ne(0)), y) / scale
    loss.backward()
    return z0


def inner_steps(model, p, delta, const, dmask, o, stats):
    b = delta.size(0)
    for _ in range(o["inner_steps"]):
        h = torch.sum(torch.tanh(model.l1(dmask * (const + delta))) * p)
        g = torch.autograd.grad(h, delta, only_inputs=True, retain_graph=False)[0]
        denorm = torch.clamp(torch.norm(g.view(b, -1), dim=1).view(-1, 1, 1), min=1e-10)
        delta = (delta + o["alpha"] * g / denorm).detach()
        if o["epsilon"] > 0:
            n = torch.norm(delta.view(b, -1), p=2, dim=1).detach()
            exceed = (n > o["epsilon"]).to(delta)
            stats["bound"] += int(exceed.sum().item())
            stats["checked"] += b
            delta = delta * (o["epsilon"] / n * exceed + (1 - exceed)).view(-1, 1, 1).detach()
        stats["norms"].append(torch.norm(delta.view(b, -1), dim=1).tolist())
        delta.requires_grad_()
    return delta


def yopo_step(model, opt, ids, mask, y, o, stats):
    m = o["steps"]
    scale = 1 + m
    emb = model.embedding(ids)
    if o["init_mag"] > 0:
        delta = torch.zeros_like(emb).uniform_(-1, 1) * mask.unsqueeze(2)
        dims = mask.sum(1) * emb.size(-1)
        delta = (delta * (o["init_mag"] / torch.sqrt(dims)).view(-1, 1, 1)).detach()
    else:
        delta = torch.zeros_like(emb).detach()  # official: Python 0 (crashes later)
    delta.requires_grad_()
    # full pass 0 draws the embedding-dropout mask (init_dp=True), after the
    # random start; every later pass reuses it without drawing.
    q = model.dropout
    dmask = torch.zeros_like(emb).bernoulli_(1 - q) / (1 - q)
    z0 = full_pass(model, ids, mask, y, delta, dmask, scale)
    stats["full"] += 1
    for _ in range(m):
        p = z0.grad.clone().detach()
        const = model.embedding(ids).detach()
        delta = inner_steps(model, p, delta, const, dmask, o, stats)
        z0 = full_pass(model, ids, mask, y, delta, dmask, scale)
        stats["full"] += 1
    opt.step()
    model.zero_grad()


def run(o, seed, stats):
    def step(model, opt, ids, mask, y):
        yopo_step(model, opt, ids, mask, y, o, stats)
    init, after = common.train(step, seed)
    stats["rng_after"] = torch.rand(1, dtype=torch.float64).item()
    return init, after


def check_first_pass_matches_model(seed):
    """The hand-made mask equals Model.first's F.dropout draw, so pass 0 is
    Model.forward exactly (same numbers, same generator position)."""
    model = common.make_model()
    model.train()
    ids, _, _ = common.batch(0)
    d = torch.zeros(3, 5, common.H, dtype=torch.float64)
    torch.manual_seed(seed)
    a = model(ids, d)
    ra = torch.rand(1).item()
    torch.manual_seed(seed)
    x = model.embedding(ids) + d
    dm = torch.zeros_like(x).bernoulli_(1 - model.dropout) / (1 - model.dropout)
    b = model.rest(torch.tanh(model.l1(dm * x)), ids.ne(0))
    rb = torch.rand(1).item()
    assert torch.equal(a, b) and ra == rb, "mask replication mismatch"


NOTE = (
    "zhuchen03/FreeLB fairseq-RoBERTa/fairseq/tasks/sentence_prediction.py "
    "yopo_train_step + yopo_inner_steps: steps = adv_steps = m, inner_steps = yopo_steps = n. "
    "Random start (init_mag>0) U(-1,1)*mask*init_mag/sqrt(len*H) drawn BEFORE full pass 0; "
    "full pass 0 draws the embedding-dropout mask (bernoulli_, after the random start); "
    "then m times: p = dL/dz0 of the last full pass, n inner steps on "
    "H = sum(first(E.detach()+delta)*p) with delta += alpha*g/clamp(||g_b||_2,1e-10) and "
    "per-example l2 rescale onto epsilon if exceeded (no float32 cast), then a full pass. "
    "So 1+m full passes, each backward of loss/(1+m); no inner steps after the last full "
    "pass; inner steps add no parameter grads. All passes (full and inner) reuse pass 0's "
    "mask without new draws (init_dp=False, no_sync_dp default False): "
    "share_dropout_mask=True. float64 (official log_softmax in float32). "
    "advtrain's steps option counts the full passes, so it is 1 + adv_steps here. "
    "Official sum-loss / sample_size == batch mean here. Adam replaced by SGD; the "
    "per-step reseed of fairseq's trainer is replaced by one manual_seed. ")


def main():
    check_first_pass_matches_model(11)
    specs = [
        ("m3_n2_init0.64", dict(steps=3, inner_steps=2, alpha=0.1, epsilon=0.4,
                                init_mag=0.64), 501,
         "Random start as in the official launch scripts (rand_init_mag 0.64)."),
        ("m3_n2_init0", dict(steps=3, inner_steps=2, alpha=0.15, epsilon=0.4,
                             init_mag=0.0), 502,
         "init_mag 0: official code would crash (delta is the int 0 passed to "
         "torch.autograd.grad); here delta starts at a zero tensor and no uniform "
         "numbers are drawn, only the dropout mask."),
    ]
    cases = []
    for name, o, seed, extra in specs:
        stats = {"bound": 0, "checked": 0, "norms": [], "full": 0}
        init, after = run(o, seed, stats)
        moved = [max(abs(a - b) for k in init
                     for a, b in zip(torch.tensor(before[k]).flatten().tolist(),
                                     torch.tensor(now[k]).flatten().tolist()))
                 for before, now in zip([init] + after[:-1], after)]
        print(f"{name}: per-step max param change "
              + ", ".join(f"{v:.3e}" for v in moved))
        print(f"  full passes {stats['full']} (3 steps); l2 projection bound for "
              f"{stats['bound']} of {stats['checked']} example inner steps")
        print("  delta norms after each inner step: "
              + "; ".join("[" + ", ".join(f"{v:.3f}" for v in r) + "]"
                          for r in stats["norms"]))
        print(f"  next default-generator double after the 3 steps: {stats['rng_after']!r}")
        # advtrain's YOPOOptions::steps counts the full passes: 1 + adv_steps.
        lib = dict(o, steps=1 + o["steps"])
        cases.append(common.case(name, "YOPO", "examples", lib, init, seed, [0, 1, 2],
                                 after, share_dropout_mask=True, note=NOTE + extra))
    common.write("yopo_fairseq.json",
                 "zhuchen03/FreeLB fairseq-RoBERTa/fairseq/tasks/sentence_prediction.py "
                 "(yopo_train_step, yopo_inner_steps)",
                 cases)


if __name__ == "__main__":
    main()

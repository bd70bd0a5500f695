"""Conformance replay: R3F as implemented in facebookresearch/fairseq.

Followed (public code index, facebookresearch/fairseq commit a4356b1d,
examples/rxf/rxf_src/sentence_prediction_r3f.py -- the criterion lived in
fairseq/criterions/sentence_prediction_r3f.py in earlier trees; the stored
copy of that path (YerevaNN/fairseq bca672eb) is the same code with
model.encoder.embed_tokens and a --regression-target flag.  Line numbers
counted by hand, +-2):

  SentencePredictionR3F.__init__ (l.16-40): noise_type "normal" ->
      torch.distributions.normal.Normal(loc=0.0, scale=eps); "uniform" ->
      torch.distributions.uniform.Uniform(low=-eps, high=eps).  The Python
      float parameters become tensors of the default dtype (float32), so
      sample() draws float32: Uniform: low + torch.rand(shape, float32) *
      (high - low); Normal: torch.normal(loc.expand(shape), scale.expand(shape))
      (the same numbers as randn(shape, float32) * eps).
  add_args (l.43-55): --eps 1e-5, --r3f-lambda 1.0, --noise-type uniform
      (examples/rxf/README.md runs RTE with --noise-type uniform
      --r3f-lambda 0.7 and the default eps).
  _get_symm_kl (l.57-73): (kl_div(log_softmax(noised), softmax(input), "sum")
      + kl_div(log_softmax(input), softmax(noised), "sum")) / B, i.e.
      KL(p || p_n) + KL(p_n || p) summed over the batch, divided by the batch
      size (both softmaxes in float32).  No detach on either side.
  forward (l.75-...):
      l.87-89   token_embeddings = model.encoder.sentence_encoder.embed_tokens(
                src_tokens)                       (the lookup, not detached)
      l.90-95   input_logits = model(..., token_embeddings=token_embeddings)
                                                  (clean pass FIRST)
      l.96      if model.training and self.noise_sampler:
      l.97-99   noise = noise_sampler.sample(sample_shape=token_embeddings.shape)
                .to(token_embeddings)             (drawn AFTER the clean pass;
                full [B, L, H] shape, NOT masked at padding)
      l.100     noised_embeddings = token_embeddings.detach().clone() + noise
                                                  (no gradient to the table)
      l.102-107 noised_logits = model(..., token_embeddings=noised_embeddings)
      l.108     symm_kl = _get_symm_kl(noised_logits, input_logits)
      l.115-123 loss = nll_loss(log_softmax(input_logits, float32), targets,
                reduction="sum"); if model.training: symm_kl = symm_kl *
                sample_size; loss = loss + r3f_lambda * symm_kl
                (regression target: mse_loss "sum" only -- the noised pass is
                run but symm_kl is NOT added.)
      returns (loss, sample_size = B, ...).
  fairseq/trainer.py Trainer.train_step: grads *= 1 / sample_size
      (optimizer.multiply_grads(numer / sample_size)), clip, optimizer step.
  So the update is that of mean CE + r3f_lambda * (KL(p||p_n) + KL(p_n||p))
  averaged over the batch, one backward, one optimizer step.

Dropout: RoBERTa's encoder (token_embeddings given: embed_scale, positions,
LayerNorm, dropout, layers) uses stock dropout modules: fresh masks at every
forward.  Order of the default generator per step: clean pass masks, the
noise draw, noised pass masks.  share_dropout_mask = False.

Adaptations (see README.md here):
  * token_embeddings = the embedding lookup output E; the clean pass is
    Model.forward(ids) (= rest(first(E))); the noised pass is
    rest(first(E.detach() + z)).  In fairseq the encoder zeroes padded
    positions after the embedding dropout, so the unmasked noise there has no
    effect; here the masked mean ignores them.  The noise is replayed
    unmasked, as drawn.
  * the noise is drawn exactly as the distribution objects draw it: float32
    (Uniform: low + rand * (high - low) in float32; Normal: torch.normal of
    float32 loc/scale), then cast to float64 (.to(token_embeddings)).  The
    script prints what a float64 draw would change (a different stream of
    the generator: ~5e-2 on the parameters), and what scaling the same
    float32 random numbers in float64 would change (below 1.2e-10: only the
    float32 draw itself matters, not the float32 arithmetic).
  * with fresh dropout masks the noised pass differs from the clean one by
    its masks as well, so even at sigma 1e-5 the symmetric KL is far from
    zero (weight 0 vs 1 moves the parameters by ~2.5e-2); the noise values
    themselves move them by ~5e-7 at sigma 1e-5, ~1.5e-3 / 5e-3 at 0.1.
  * float64 elsewhere; the float32 log_softmax/softmax casts are dropped.
  * the official loss is a batch sum and the trainer divides by sample_size
    = B: same update as the batch-mean loss used here.
  * Adam + polynomial decay + fp16 -> plain SGD.
This script is written from a reading of the official code, not copied.
"""

import torch
import torch.nn.functional as F

import common

# fairseq's torch.distributions samplers draw in the default dtype.
NOISE_DTYPE = torch.float32


def sampler(opts):
    """SentencePredictionR3F.__init__'s noise_sampler."""
    if opts["normal_noise"]:
        return torch.distributions.normal.Normal(loc=0.0, scale=opts["sigma"])
    return torch.distributions.uniform.Uniform(low=-opts["sigma"], high=opts["sigma"])


def sample_noise(opts, shape, like, dtype):
    if dtype == torch.float32:
        return sampler(opts).sample(sample_shape=shape).to(like)
    # not official, only to show what matters: "f32 draw, f64 arithmetic" (the
    # same float32 random numbers, scaled in float64), or a float64 draw
    if dtype == "f32 draw, f64 arithmetic":
        if opts["normal_noise"]:
            return torch.randn(shape, dtype=torch.float32).to(like) * opts["sigma"]
        r = torch.rand(shape, dtype=torch.float32).to(like)
        return -opts["sigma"] + r * (2 * opts["sigma"])
    if opts["normal_noise"]:
        return torch.randn(shape, dtype=dtype) * opts["sigma"]
    return -opts["sigma"] + torch.rand(shape, dtype=dtype) * (2 * opts["sigma"])


def symm_kl(noised_logits, input_logits):
    """_get_symm_kl (sum over the batch / B), float64."""
    return (F.kl_div(F.log_softmax(noised_logits, dim=-1),
                     F.softmax(input_logits, dim=-1), None, None, "sum")
            + F.kl_div(F.log_softmax(input_logits, dim=-1),
                       F.softmax(noised_logits, dim=-1), None, None, "sum")
            ) / noised_logits.size(0)


def run(opts, seed, weight=None, noise_dtype=NOISE_DTYPE, noise_scale=1.0):
    weight = opts["weight"] if weight is None else weight

    def step(model, opt, ids, _mask, y):
        pad_mask = ids.ne(0)
        token_embeddings = model.embedding(ids)
        input_logits = model.rest(model.first(token_embeddings), pad_mask)
        noise = sample_noise(opts, token_embeddings.shape, token_embeddings,
                             noise_dtype)
        noised_embeddings = token_embeddings.detach().clone() + noise * noise_scale
        noised_logits = model.rest(model.first(noised_embeddings), pad_mask)
        loss = common.task_loss(input_logits, y)
        loss = loss + weight * symm_kl(noised_logits, input_logits)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return common.train(step, seed)


NOTE = ("fairseq R3F (sentence_prediction_r3f): E = embed_tokens(ids); clean pass on E; "
        "THEN noise drawn by torch.distributions (uniform: -sigma + rand_f32 * (2 sigma) "
        "computed in float32 as low + rand*(high-low); normal: torch.normal(0, sigma) in "
        "float32), shape [B,L,H], not masked, cast to float64; noised pass on E.detach() + "
        "noise; loss = CE (batch mean; fairseq: sum / sample_size) + weight * (KL(p||p_n) + "
        "KL(p_n||p)) summed over the batch / B, no stop-gradient on either side; one "
        "backward, one SGD step. Fresh dropout masks: clean pass, noise draw, noised pass. "
        "float64 except the float32 noise draw; fairseq's float32 softmax casts dropped.")

CASES = [
    ("r3f_uniform_1e-5", dict(sigma=1e-5, normal_noise=False, weight=1.0), 301),
    ("r3f_uniform_0.1", dict(sigma=0.1, normal_noise=False, weight=0.5), 302),
    ("r3f_normal_0.1", dict(sigma=0.1, normal_noise=True, weight=1.0), 303),
]


def main():
    cases = []
    for name, opts, seed in CASES:
        init, after = run(opts, seed)
        _, after_w0 = run(opts, seed, weight=0.0)
        _, after_z0 = run(opts, seed, noise_scale=0.0)
        _, after_f64 = run(opts, seed, noise_dtype=torch.float64)
        _, after_mix = run(opts, seed, noise_dtype="f32 draw, f64 arithmetic")
        moved = common.max_diff([init] + after[:-1], after)
        print(f"{name}: max param change per step {moved:.3e}; "
              f"weight 0 vs {opts['weight']}: {common.max_diff(after, after_w0):.3e}; "
              f"noise zeroed (same draws): {common.max_diff(after, after_z0):.3e}; "
              f"float64 noise draw: {common.max_diff(after, after_f64):.3e}; "
              f"f32 draw, f64 arithmetic: {common.max_diff(after, after_mix):.3e}")
        cases.append(common.case(
            name, "R3F", "examples", opts, init, seed, [0, 1, 2], after,
            share_dropout_mask=False, note=NOTE))
    common.write("r3f_fairseq.json",
                 "facebookresearch/fairseq examples/rxf/rxf_src/sentence_prediction_r3f.py "
                 "(SentencePredictionR3F)", cases)


if __name__ == "__main__":
    main()

"""Conformance replay: "free" adversarial training (Shafahi et al. 2019) as
implemented in mahyarnajibi/FreeAdversarialTraining.

Follows (public code index, commit d7077403 of main_free.py):

  main_free.py
    module level, just above train(): global_noise_data =
        zeros([batch_size, 3, crop, crop]) -- created once, never reset, so the
        noise persists across batches (and epochs), indexed by the slot in
        the batch, not by the example.
    train(): model.train(); for each batch, for j in range(n_repeats):
        noise_batch = Variable(global_noise_data[0:B], requires_grad=True)
        in1 = input + noise_batch; in1.clamp_(0, 1); in1.sub_(mean).div_(std)
        output = model(in1); loss = criterion(output, target)  (CE, batch mean)
        optimizer.zero_grad(); loss.backward()        (one backward: parameter
                                                       and noise gradients)
        pert = fgsm(noise_batch.grad, fgsm_step)      (lib/utils.py fgsm:
                                                       step_size * sign(grad))
        global_noise_data[0:B] += pert
        global_noise_data.clamp_(-clip_eps, clip_eps) (elementwise L-inf box)
        optimizer.step()                              (after the noise update,
                                                       with the gradient taken at
                                                       the old noise)
    main(): epochs /= n_repeats; fgsm_step and clip_eps divided by
        max_color_value (255) -- image units, not used here.
  configs.yml: clip_eps 4, fgsm_step 4 (i.e. 4/255), n_repeats 4, SGD lr 0.1
      momentum 0.9 weight decay 1e-4 (this replay: plain SGD, common.LR).

Adaptations (see README.md here):
  * the image input is replaced by the embedding lookup output; the noise is
    the per-example delta [B, L, H] added to it (Model.forward(ids, delta)).
  * dropped, image only: the clamp of input + noise to [0, 1] (which would
    zero the noise gradient where the pixel saturates) and the mean/std
    normalization; also the 1/255 scaling of fgsm_step/clip_eps and the
    learning-rate schedule adjust_learning_rate.
  * one replay = one optimizer step; a golden `after` entry is taken after
    the last replay of each batch.  All batches have the same shape, so
    global_noise_data[0:B] is the whole buffer.
  * float64; one forward per replay, so dropout masks are simply drawn fresh
    in program order (share_dropout_mask False).
This script is written from a reading of the official code, not copied.
"""

import torch

import common


def run(opts, seed):
    model = common.make_model()
    init = common.snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=common.LR)
    model.train()
    eps, step, replays = opts["epsilon"], opts["alpha"], opts["replays"]
    b, l = common.batch(0)[0].shape
    global_noise = torch.zeros(b, l, common.H, dtype=torch.float64)
    after = []
    clamp_hits = 0
    torch.manual_seed(seed)
    for i in range(3):
        ids, _, y = common.batch(i)
        for _ in range(replays):
            noise_batch = global_noise[0:ids.size(0)].clone().requires_grad_()
            out = model(ids, delta=noise_batch)
            loss = common.task_loss(out, y)
            opt.zero_grad()
            loss.backward()
            global_noise[0:ids.size(0)] += step * torch.sign(noise_batch.grad)
            clamp_hits += int((global_noise.abs() > eps).sum())
            global_noise.clamp_(-eps, eps)
            opt.step()
        after.append(common.snapshot(model))
    return init, after, clamp_hits, global_noise


def main():
    opts = dict(epsilon=0.015, alpha=0.01, replays=3)
    seed = 201
    init, after, clamp_hits, noise = run(opts, seed)
    moved = max(abs(a - b) for k in init
                for a, b in zip(torch.tensor(init[k]).flatten().tolist(),
                                torch.tensor(after[-1][k]).flatten().tolist()))
    print(f"freeat_r3: max param change over 3 batches {moved:.3e}; "
          f"clamp bound {clamp_hits} elements; final |delta| max {noise.abs().max():.4f}, "
          f"distinct |delta| values {sorted(set(round(v, 6) for v in noise.abs().flatten().tolist()))}")
    note = ("FreeAdversarialTraining main_free.py train(): delta [B,L,H] on the lookup "
            "output starts at zero once and persists across batches (by batch slot); per "
            "replay: forward at the current delta, zero_grad, one backward, delta += "
            "alpha*sign(grad_delta), clamp delta to [-epsilon, epsilon], then SGD step "
            "(gradient taken at the old delta). Dropped image-only parts: clamp of "
            "input+noise to [0,1], mean/std normalization, /255 scaling, LR schedule; "
            "plain SGD instead of momentum 0.9 + weight decay. One golden snapshot per "
            "batch, after its `replays` optimizer steps. float64.")
    case = common.case("freeat_r3", "FreeAT", "examples", opts, init, seed,
                       [0, 1, 2], after, share_dropout_mask=False, note=note)
    common.write("freeat_main_free.json",
                 "mahyarnajibi/FreeAdversarialTraining main_free.py (train), lib/utils.py (fgsm)",
                 [case])


if __name__ == "__main__":
    main()

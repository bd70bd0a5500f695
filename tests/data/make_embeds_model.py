"""Writes tests/data/embeds_classifier.pt, the TorchScript model of
advtrain's `inputs_embeds` tests: a model whose forward takes embeddings,
as Hugging Face models take `inputs_embeds`, with its lookup exported as
`embed(ids)`. Embedding 12 x 4, tanh, dropout 0.25, masked mean, linear
4 -> 3; float64, seed 0. Run once, by hand, with Debian's python3-torch
(not at test time):

    /usr/bin/python3 tests/data/make_embeds_model.py
"""

import os

import torch
import torch.nn as nn


class EmbedsClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(12, 4)
        self.dropout = nn.Dropout(0.25)
        self.fc = nn.Linear(4, 3)

    @torch.jit.export
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def forward(self, inputs_embeds: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        h = self.dropout(torch.tanh(inputs_embeds))
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.fc((h * m).sum(1) / m.sum(1))


torch.manual_seed(0)
model = torch.jit.script(EmbedsClassifier().double())
out = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                   "embeds_classifier.pt")
model.save(out)
print("wrote", out, "with torch", torch.__version__)

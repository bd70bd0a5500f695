"""Writes tests/data/scripted_classifier.pt, the TorchScript model of
advtrain's TorchScript test: embedding (10 x 4) -> mean over the sequence ->
linear (4 -> 3), float64, seed 0. Run once, by hand, with Debian's
python3-torch (not at test time):

    /usr/bin/python3 tests/data/make_scripted_model.py
"""

import os

import torch
import torch.nn as nn


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(ids).mean(1))


torch.manual_seed(0)
model = torch.jit.script(Classifier().double())
out = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                   "scripted_classifier.pt")
model.save(out)
print("wrote", out, "with torch", torch.__version__)

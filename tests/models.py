"""Small hand-written models shared by the tests."""

import torch
from torch import nn

import loratrf


class Block(nn.Module):
    """A Transformer-like layer with BERT's module names (query/key/value, up/down FFN)."""

    def __init__(self, d=8, ffn=16):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        attn = torch.softmax(self.query(x) @ self.key(x).transpose(-1, -2), -1) @ self.value(x)
        x = self.norm(x + attn)
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self, layers=2, d=8, vocab=20, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, 2 * d) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x[:, 0])


TARGETS = [r"layers\.\d+\.(value|up|down)"]
FILTERS = [r"layers\.\d+"]


def randomise_adapters(model, generator=None):
    """Give every zero-initialised adapter factor random values, as training would."""
    with torch.no_grad():
        for name, p in loratrf.adapter_state_dict(model).items():
            if name.endswith((".V", "task_vector")):
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))

"""Time trace + grouping per model, side by side with Torch-Pruning's DependencyGraph.

Usage: ``python benchmarks/graph_build.py [--repeat 3]``. Prints one row per model: traced nodes,
our groups (prunable), our build time, Torch-Pruning's ``build_dependency`` time and group count,
and whether our cost model reproduces the dense params/FLOPs count exactly.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.graph import build, dense_counts


class Block(nn.Module):
    def __init__(self, c: int, stride: int = 1, cin: int | None = None) -> None:
        super().__init__()
        cin = cin or c
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = None if stride == 1 and cin == c else nn.Sequential(
            nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNetLike(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            layers += [Block(w, 1 if i == 0 else 2, cin), Block(w)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.pw = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.se1, self.se2 = nn.Conv2d(h, h // 4, 1), nn.Conv2d(h // 4, h, 1)
        self.proj = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(self.pw(x))
        h = h * torch.sigmoid(self.se2(F.relu(self.se1(h.mean((2, 3), keepdim=True)))))
        return x + self.proj(h)


class MobileNetLike(nn.Module):
    def __init__(self, c: int = 32, depth: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 2, 1)
        self.blocks = nn.Sequential(*[InvertedResidual(c) for _ in range(depth)])
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class EncoderLayer(nn.Module):
    def __init__(self, e: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(e), nn.LayerNorm(e)
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(e, 4 * e), nn.Linear(4 * e, e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViTLike(nn.Module):
    def __init__(self, e: int = 192, heads: int = 3, depth: int = 6, patch: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, e, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (32 // patch) ** 2, e))
        self.layers = nn.Sequential(*[EncoderLayer(e, heads) for _ in range(depth)])
        self.head = nn.Linear(e, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.layers(x).mean(1))


class HandAttn(nn.Module):
    def __init__(self, e: int, heads: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, e // heads
        self.qkv = nn.Linear(e, 3 * e)
        self.o = nn.Linear(e, e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, self.hd).transpose(1, 2) for z in (q, k, v))
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.hd), dim=-1)
        return self.o((w @ v).transpose(1, 2).reshape(b, t, e))


class GPTLike(nn.Module):
    def __init__(self, vocab: int = 1000, e: int = 256, heads: int = 4, depth: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, e)
        self.attn = nn.ModuleList([HandAttn(e, heads) for _ in range(depth)])
        self.ln = nn.ModuleList([nn.LayerNorm(e) for _ in range(depth)])
        self.head = nn.Linear(e, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for ln, attn in zip(self.ln, self.attn, strict=True):
            x = x + attn(ln(x))
        return self.head(x)


def subjects() -> list[tuple[str, Callable[[], nn.Module], Any]]:
    out: list[tuple[str, Callable[[], nn.Module], Any]] = [
        ("resnet18-like", ResNetLike, torch.randn(1, 3, 32, 32)),
        ("mobilenet-like (dw+SE)", MobileNetLike, torch.randn(1, 3, 32, 32)),
        ("vit-like (nn.MHA)", ViTLike, torch.randn(1, 3, 32, 32)),
        ("gpt-like (hand attn, tied)", GPTLike, torch.randint(0, 1000, (1, 32))),
    ]
    try:
        from secateurs.models import cnn

        out.append(("mnist1d_cnn", cnn.mnist1d_cnn, torch.randn(1, 1, 40)))
        out.append(("digits_cnn", cnn.digits_cnn, torch.randn(1, 1, 8, 8)))
    except ImportError:
        pass
    try:
        from secateurs.models import minilm

        ids = torch.randint(0, 1000, (1, 32))
        out.append(("MiniLM-L6 (random init)", lambda: minilm.SentenceEncoder(minilm.BertConfig()),
                    (ids, torch.ones_like(ids))))
    except (ImportError, AttributeError):
        pass
    try:
        from secateurs.models.reference import REFERENCE_MODELS  # type: ignore[import-not-found]

        for name, entry in REFERENCE_MODELS.items():
            factory = getattr(entry, "factory", entry)
            inputs = getattr(entry, "example_inputs", None)
            if callable(inputs):
                inputs = inputs()
            if inputs is not None:
                out.append((f"ref:{name}", factory, inputs))
    except ImportError:
        pass
    return out


def best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, result = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
    torch.manual_seed(0)
    warm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    build(warm, torch.randn(1, 3, 8, 8))  # one-time FlopCounterMode/kernel warm-up, for both sides
    if tp is not None:
        tp.DependencyGraph().build_dependency(warm, example_inputs=torch.randn(1, 3, 8, 8))
    rows = [("model", "nodes", "groups", "prunable", "ours ms", "TP ms", "TP groups", "cost exact")]
    for name, factory, x in subjects():
        model = factory().eval()
        t_ours, g = best_of(lambda m=model, x=x: build(m, x), args.repeat)
        truth = dense_counts(model, x)
        exact = "yes" if g.cost() == truth else f"no ({g.cost()} vs {truth})"
        t_tp, n_tp = "n/a", "n/a"
        if tp is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t, dg = best_of(lambda m=model, x=x: tp.DependencyGraph().build_dependency(m, example_inputs=x),
                                    args.repeat)
                    t_tp, n_tp = f"{1000 * t:.0f}", str(len(list(dg.get_all_groups())))
            except Exception as e:  # noqa: BLE001 - a peer failing is a result to report, not a crash
                t_tp, n_tp = "fails", type(e).__name__
        rows.append((name, str(len(g.nx)), str(len(g.groups)), str(len(g.prunable_groups())),
                     f"{1000 * t_ours:.0f}", t_tp, n_tp, exact))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


if __name__ == "__main__":
    main()

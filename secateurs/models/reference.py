"""Small reference architectures: the test bed of the graph and of ``apply``, later benchmark subjects.

Each is a factory with width arguments (so a pruned model can be compared with a narrower fresh one)
registered in :data:`REFERENCE_MODELS` with a deterministic example-input maker. They are tiny on
purpose: a forward on the example inputs takes milliseconds on a CPU, so property tests can run
many of them. Together they cover every op the dependency graph must understand (see each
entry's ``covers``); all are traceable by ``torch.fx.symbolic_trace``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "REFERENCE_MODELS",
    "ReferenceModel",
    "autoencoder",
    "cnn1d",
    "convnext",
    "densenet",
    "gpt",
    "inception",
    "mobilenet_v2",
    "resnet_basic",
    "resnet_bottleneck",
    "resnext",
    "two_heads",
    "unet",
    "vgg",
    "vit",
]


def _randn(*shape: int, seed: int = 0) -> Tensor:
    """Deterministic inputs independent of the global RNG (tests must not depend on call order)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- ResNet ------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN, residual add (1x1 projection when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(y + identity)


class ResNetBasic(nn.Module):
    def __init__(self, widths: tuple[int, int] = (8, 12), num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = BasicBlock(widths[0], widths[0])
        self.layer2 = BasicBlock(widths[0], widths[1], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_basic(widths: tuple[int, int] = (8, 12), num_classes: int = 5) -> nn.Module:
    """ResNet with basic blocks (identity and projection shortcuts), global pooling, linear head."""
    return ResNetBasic(widths, num_classes)


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand, residual add."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetBottleneck(nn.Module):
    def __init__(self, width: int = 8, mid: int = 4, out: int = 16, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.block1 = Bottleneck(width, mid, out, stride=2)
        self.block2 = Bottleneck(out, mid, out)
        self.fc = nn.Linear(out, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet_bottleneck(width: int = 8, mid: int = 4, out: int = 16, num_classes: int = 5) -> nn.Module:
    """ResNet with bottleneck blocks (projection then identity), max-pool stem."""
    return ResNetBottleneck(width, mid, out, num_classes)


# -- ResNeXt ---------------------------------------------------------------------------------


class ResNeXt(nn.Module):
    def __init__(self, stem: int = 8, width: int = 8, out: int = 12, groups: int = 2, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        self.block1 = Bottleneck(stem, width, out, stride=2, groups=groups)  # cardinality: grouped 3x3
        self.block2 = Bottleneck(out, 2 * width, out, groups=2 * groups)
        self.fc = nn.Linear(out, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnext(stem: int = 8, width: int = 8, out: int = 12, groups: int = 2, num_classes: int = 5) -> nn.Module:
    """ResNeXt with grouped 3x3 convs (cardinality ``groups``, then twice that in the second block).

    ``width`` is the first block's inner width (a multiple of ``groups``): a grouped conv prunes
    within its groups, so a pruned model is a narrower ResNeXt with the same cardinality.
    """
    return ResNeXt(stem, width, out, groups, num_classes)


# -- VGG ---------------------------------------------------------------------------------------


class VGG(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (6, 8, 10), hidden: int = 16, num_classes: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        # 16x16 input, one 2x pooling per stage: the flatten maps each channel to a block of H*W features
        side = 16 // 2 ** len(widths)
        self.classifier = nn.Sequential(nn.Linear(cin * side * side, hidden), nn.ReLU(), nn.Dropout(0.1),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg(widths: tuple[int, ...] = (6, 8, 10), hidden: int = 16, num_classes: int = 4) -> nn.Module:
    """VGG-style stack; the last feature map (2x2) is flattened into a linear layer."""
    return VGG(widths, hidden, num_classes)


# -- MobileNetV2 -------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: pooled channels -> bottleneck -> sigmoid gate broadcast-multiplied back."""

    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, SE, 1x1 linear projection (+ residual)."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int = 1, se: int = 0) -> None:
        super().__init__()
        h = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h),
                                       nn.ReLU6())
        self.se = SqueezeExcite(h, se) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self, width: int = 8, expand: int = 3, last: int = 16, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(width, width, expand, se=4),
            InvertedResidual(width, width + 4, expand, stride=2),
        )
        self.last = nn.Sequential(nn.Conv2d(width + 4, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


def mobilenet_v2(width: int = 8, expand: int = 3, last: int = 16, num_classes: int = 4) -> nn.Module:
    """MobileNetV2-style: inverted residuals with depthwise convs, ReLU6, squeeze-excitation."""
    return MobileNetV2(width, expand, last, num_classes)


# -- DenseNet ----------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], dim=1)


class DenseNet(nn.Module):
    def __init__(self, init: int = 6, growth: int = 4, layers: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, init, 3, padding=1, bias=False)
        blocks = [DenseLayer(init + i * growth, growth) for i in range(layers)]
        self.block = nn.Sequential(*blocks)
        c = init + layers * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                        nn.AvgPool2d(2))
        self.fc = nn.Linear(c // 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.transition(self.block(self.stem(x)))
        return self.fc(F.adaptive_max_pool2d(x, 1).flatten(1))


def densenet(init: int = 6, growth: int = 4, layers: int = 3, num_classes: int = 4) -> nn.Module:
    """DenseNet-style block: every layer concatenates its new features onto its input."""
    return DenseNet(init, growth, layers, num_classes)


# -- Inception ---------------------------------------------------------------------------------


class InceptionBlock(nn.Module):
    """Four branches concatenated; then a gated 1x1 conv whose output is chunked into value and gate."""

    def __init__(self, cin: int, b1: int, b2: tuple[int, int], b3: tuple[int, int], b4: int, gate: int) -> None:
        super().__init__()
        self.branch1 = nn.Conv2d(cin, b1, 1)
        self.branch2 = nn.Sequential(nn.Conv2d(cin, b2[0], 1), nn.ReLU(), nn.Conv2d(b2[0], b2[1], 3, padding=1))
        self.branch3 = nn.Sequential(nn.Conv2d(cin, b3[0], 1), nn.ReLU(), nn.Conv2d(b3[0], b3[1], 5, padding=2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, b4, 1))
        cat = b1 + b2[1] + b3[1] + b4
        self.bn = nn.BatchNorm2d(cat)
        self.glu = nn.Conv2d(cat, 2 * gate, 1)
        self.split_at = (b1 + b2[1], b3[1] + b4)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)
        y = F.relu(self.bn(y))
        a, b = torch.chunk(self.glu(y), 2, dim=1)
        return a * torch.sigmoid(b)


class Inception(nn.Module):
    def __init__(self, stem: int = 6, b1: int = 3, b2: tuple[int, int] = (3, 4), b3: tuple[int, int] = (2, 3),
                 b4: int = 2, gate: int = 5, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, padding=1), nn.ReLU())
        self.block = InceptionBlock(stem, b1, b2, b3, b4, gate)
        self.head_a = nn.Linear(3, num_classes)
        self.head_b = nn.Linear(gate - 3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        y = F.adaptive_avg_pool2d(self.block(self.stem(x)), 1).flatten(1)
        # split sizes read from the heads' widths, so they stay right when either part is pruned
        p, q = torch.split(y, [self.head_a.in_features, self.head_b.in_features], dim=1)
        return self.head_a(p) + self.head_b(q)


def inception(stem: int = 6, b1: int = 3, b2: tuple[int, int] = (3, 4), b3: tuple[int, int] = (2, 3),
              b4: int = 2, gate: int = 5, num_classes: int = 4) -> nn.Module:
    """Inception-style block: branch outputs concatenated, chunk (GLU gate) and split with offsets."""
    return Inception(stem, b1, b2, b3, b4, gate, num_classes)


# -- U-Net -------------------------------------------------------------------------------------


def _double(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())


class UNet(nn.Module):
    def __init__(self, base: int = 4, groups: int = 2, cin: int = 1, cout: int = 1) -> None:
        super().__init__()
        self.enc1 = _double(cin, base, groups)
        self.enc2 = _double(base, 2 * base, groups)
        self.mid = _double(2 * base, 4 * base, groups)
        self.up2 = nn.ConvTranspose2d(4 * base, 2 * base, 2, stride=2)
        self.dec2 = _double(4 * base, 2 * base, groups)
        self.up1 = nn.ConvTranspose2d(2 * base, base, 2, stride=2)
        self.dec1 = _double(2 * base, base, groups)
        self.out = nn.Conv2d(base, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


def unet(base: int = 4, groups: int = 2, cin: int = 1, cout: int = 1) -> nn.Module:
    """Two-level U-Net: GroupNorm, ConvTranspose2d up-sampling, skip connections by concatenation."""
    return UNet(base, groups, cin, cout)


# -- 1-D CNN -----------------------------------------------------------------------------------


class CNN1d(nn.Module):
    def __init__(self, widths: tuple[int, int] = (6, 8), num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, widths[0], 5, padding=2)
        self.bn1 = nn.BatchNorm1d(widths[0])
        self.pool = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(widths[0], widths[1], 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(widths[1])
        self.fc = nn.Linear(widths[1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool1d(x, 1).flatten(1))


def cnn1d(widths: tuple[int, int] = (6, 8), num_classes: int = 4) -> nn.Module:
    """1-D CNN (Conv1d, BatchNorm1d, MaxPool1d) for sequences such as MNIST-1D."""
    return CNN1d(widths, num_classes)


# -- transformers ------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer around ``nn.MultiheadAttention`` and a GELU MLP."""

    def __init__(self, embed: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(embed)
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(embed)
        self.fc1 = nn.Linear(embed, mlp)
        self.fc2 = nn.Linear(mlp, embed)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class ViT(nn.Module):
    def __init__(self, embed: int = 16, heads: int = 4, depth: int = 2, mlp: int = 24, patch: int = 4,
                 num_classes: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, embed, patch, patch)
        self.pos = nn.Parameter(0.02 * _randn(1, (16 // patch) ** 2, embed, seed=1))
        self.layers = nn.Sequential(*[EncoderLayer(embed, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed)
        self.head = nn.Linear(embed, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.layers(x)).mean(1))


def vit(embed: int = 16, heads: int = 4, depth: int = 2, mlp: int = 24, patch: int = 4,
        num_classes: int = 4) -> nn.Module:
    """ViT-style encoder: patch conv, position parameter, ``nn.MultiheadAttention``, LayerNorm, GELU."""
    return ViT(embed, heads, depth, mlp, patch, num_classes)


class SelfAttention(nn.Module):
    """Hand-written multi-head attention (BERT/GPT style): q/k/v Linear, view, transpose, matmul, softmax.

    ``num_heads`` is read at every forward, so pruning heads only has to update that attribute;
    ``head_dim`` stays.
    """

    def __init__(self, embed: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed // num_heads
        self.query = nn.Linear(embed, num_heads * self.head_dim)
        self.key = nn.Linear(embed, num_heads * self.head_dim)
        self.value = nn.Linear(embed, num_heads * self.head_dim)
        self.out = nn.Linear(num_heads * self.head_dim, embed)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.query(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        w = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim), dim=-1)
        y = torch.matmul(self.drop(w), v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.out(y)


class GPTBlock(nn.Module):
    def __init__(self, embed: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(embed)
        self.attn = SelfAttention(embed, heads)
        self.ln2 = nn.LayerNorm(embed)
        self.fc1 = nn.Linear(embed, mlp)
        self.fc2 = nn.Linear(mlp, embed)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 32, embed: int = 16, heads: int = 4, depth: int = 2, mlp: int = 24,
                 seq: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, embed)
        self.pos = nn.Parameter(0.02 * _randn(1, seq, embed, seed=2))
        self.blocks = nn.Sequential(*[GPTBlock(embed, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed)
        self.lm_head = nn.Linear(embed, vocab, bias=False)
        self.lm_head.weight = self.tok.weight  # weight tying: one parameter, two modules

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos
        return self.lm_head(self.norm(self.blocks(x)))


def gpt(vocab: int = 32, embed: int = 16, heads: int = 4, depth: int = 2, mlp: int = 24, seq: int = 8) -> nn.Module:
    """Tiny language model: hand-written attention, LayerNorm, GELU MLP, LM head tied to the embedding."""
    return GPT(vocab, embed, heads, depth, mlp, seq)


# -- ConvNeXt ----------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, channels-last permute, LayerNorm, pointwise MLP, layer-scale, residual."""

    def __init__(self, c: int, mlp: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, mlp)
        self.pw2 = nn.Linear(mlp, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, width: int = 8, mlp: int = 16, depth: int = 2, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 2, 2)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(width, mlp) for _ in range(depth)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def convnext(width: int = 8, mlp: int = 16, depth: int = 2, num_classes: int = 4) -> nn.Module:
    """ConvNeXt-style blocks: channels-last permute, LayerNorm over channels, layer-scale parameter."""
    return ConvNeXt(width, mlp, depth, num_classes)


# -- autoencoder and multi-input/output ------------------------------------------------------


class AutoEncoder(nn.Module):
    def __init__(self, hidden: int = 24, latent: int = 6, side: int = 8) -> None:
        super().__init__()
        self.side = side
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(side * side, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, side * side), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x)).view(-1, 1, self.side, self.side)


def autoencoder(hidden: int = 24, latent: int = 6, side: int = 8) -> nn.Module:
    """MLP autoencoder whose latent bottleneck is its own group (the component boundary)."""
    return AutoEncoder(hidden, latent, side)


class TwoHeads(nn.Module):
    def __init__(self, conv: int = 6, tab: int = 5, shared: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, conv, 3, padding=1)
        self.bn = nn.BatchNorm2d(conv)
        self.tab = nn.Linear(4, tab)
        self.shared = nn.Linear(conv + tab, shared)
        self.cls = nn.Linear(shared, classes)
        self.reg = nn.Linear(shared, 1)

    def forward(self, image: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
        a = F.avg_pool2d(F.relu(self.bn(self.conv(image))), 2).amax((2, 3))
        b = torch.tanh(self.tab(features))
        h = F.relu(self.shared(torch.cat([a, b], dim=1)))
        return self.cls(h), self.reg(h)


def two_heads(conv: int = 6, tab: int = 5, shared: int = 12, classes: int = 3) -> nn.Module:
    """Two inputs (image, tabular features) fused by concatenation, two outputs (class logits, regression)."""
    return TwoHeads(conv, tab, shared, classes)


# -- registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceModel:
    """A reference architecture: its factory, deterministic example inputs, and what ops it covers."""

    name: str
    factory: Callable[..., nn.Module]
    make_inputs: Callable[[], Any]
    covers: tuple[str, ...] = ()

    def example_inputs(self) -> Any:
        """Fresh deterministic example inputs (a tensor or a tuple of positional tensors)."""
        return self.make_inputs()

    def build(self, seed: int = 0, **widths: Any) -> nn.Module:
        """The model with deterministically initialised weights, in eval mode."""
        torch.manual_seed(seed)
        return self.factory(**widths).eval()


def _image(c: int = 3, side: int = 16, n: int = 2) -> Callable[[], Tensor]:
    return lambda: _randn(n, c, side, side)


REFERENCE_MODELS: dict[str, ReferenceModel] = {
    m.name: m
    for m in [
        ReferenceModel("resnet_basic", resnet_basic, _image(),
                       ("Conv2d", "BatchNorm2d", "residual add", "projection shortcut", "AdaptiveAvgPool2d",
                        "flatten")),
        ReferenceModel("resnet_bottleneck", resnet_bottleneck, _image(),
                       ("bottleneck", "MaxPool2d", "residual add")),
        ReferenceModel("resnext", resnext, _image(),
                       ("grouped Conv2d", "cardinality", "bottleneck", "residual add")),
        ReferenceModel("vgg", vgg, _image(), ("flatten into Linear", "Dropout", "MaxPool2d", "conv bias")),
        ReferenceModel("mobilenet_v2", mobilenet_v2, _image(),
                       ("depthwise Conv2d", "inverted residual", "squeeze-excitation", "ReLU6", "mean pooling")),
        ReferenceModel("densenet", densenet, _image(), ("cat (dense concat)", "AvgPool2d", "adaptive max pool")),
        ReferenceModel("inception", inception, _image(), ("cat of branches", "chunk", "split", "GLU gate")),
        ReferenceModel("unet", unet, _image(c=1), ("ConvTranspose2d", "skip cat", "GroupNorm")),
        ReferenceModel("cnn1d", cnn1d, lambda: _randn(3, 1, 32), ("Conv1d", "BatchNorm1d", "MaxPool1d")),
        ReferenceModel("vit", vit, _image(),
                       ("nn.MultiheadAttention", "LayerNorm", "GELU", "residual", "position parameter",
                        "flatten/transpose")),
        ReferenceModel("gpt", gpt, lambda: torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0)),
                       ("hand-written attention", "Embedding", "weight tying", "LayerNorm", "view/transpose/matmul")),
        ReferenceModel("convnext", convnext, _image(),
                       ("channels-last permute", "LayerNorm over channels", "layer-scale parameter", "depthwise")),
        ReferenceModel("autoencoder", autoencoder, lambda: _randn(4, 1, 8, 8), ("latent bottleneck", "nn.Flatten",
                                                                                "Sigmoid", "view")),
        ReferenceModel("two_heads", two_heads, lambda: (_randn(2, 3, 8, 8), _randn(2, 4, seed=1)),
                       ("several inputs", "several outputs", "cat of features", "tanh")),
    ]
}

"""Reference models: at least 12, tiny, deterministic, fx-traceable, covering every op the graph handles."""

from __future__ import annotations

import time

import pytest
import torch
from torch import fx, nn

from secateurs.models.reference import REFERENCE_MODELS, ReferenceModel

NAMES = sorted(REFERENCE_MODELS)


def _outputs(y: object) -> tuple[torch.Tensor, ...]:
    return y if isinstance(y, tuple) else (y,)  # type: ignore[return-value]


def _args(x: object) -> tuple[object, ...]:
    return x if isinstance(x, tuple) else (x,)


def test_registry_has_at_least_twelve() -> None:
    assert len(REFERENCE_MODELS) >= 12
    assert all(isinstance(r, ReferenceModel) and r.name == n for n, r in REFERENCE_MODELS.items())


@pytest.mark.parametrize("name", NAMES)
def test_builds_runs_fast_traces_and_is_deterministic(name: str) -> None:
    ref = REFERENCE_MODELS[name]
    x1, x2 = ref.example_inputs(), ref.example_inputs()
    for a, b in zip(_args(x1), _args(x2), strict=True):
        assert torch.equal(a, b)  # type: ignore[arg-type]
    m1, m2 = ref.build(), ref.build()
    assert not m1.training
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True))
    with torch.no_grad():
        m1(*_args(x1))  # warm-up
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # CPU time of one thread: robust on the shared CI machine
        try:
            best = float("inf")
            for _ in range(5):
                t = time.process_time()
                y = m1(*_args(x1))
                best = min(best, time.process_time() - t)
        finally:
            torch.set_num_threads(threads)
        assert best < 0.05, f"{name}: a forward took {1000 * best:.1f} ms of CPU"
        y = m1(*_args(x1))  # with the usual threads, like the traced run below
        traced = fx.symbolic_trace(m1)
        for u, v in zip(_outputs(y), _outputs(traced(*_args(x1))), strict=True):
            assert torch.equal(u, v)
    assert all(torch.isfinite(u).all() for u in _outputs(y))


@pytest.mark.parametrize("name", NAMES)
def test_widths_are_arguments(name: str) -> None:
    """Each factory takes width arguments with defaults; a narrower model has fewer parameters."""
    narrower = {
        "resnet_basic": dict(widths=(4, 6)), "resnet_bottleneck": dict(width=4, mid=2, out=8),
        "resnext": dict(width=4, out=8),
        "vgg": dict(widths=(3, 4, 5), hidden=8), "mobilenet_v2": dict(width=4, expand=2, last=8),
        "densenet": dict(init=4, growth=2), "inception": dict(stem=4, b1=2, b2=(2, 2), b3=(1, 2), b4=1, gate=4),
        "unet": dict(base=2), "cnn1d": dict(widths=(3, 4)), "vit": dict(embed=8, heads=2, mlp=8),
        "gpt": dict(embed=8, heads=2, mlp=8), "convnext": dict(width=4, mlp=8), "autoencoder": dict(hidden=8, latent=3),
        "two_heads": dict(conv=3, tab=2, shared=4),
    }[name]
    ref = REFERENCE_MODELS[name]
    small, big = ref.build(**narrower), ref.build()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in big.parameters())
    with torch.no_grad():
        a, b = _outputs(small(*_args(ref.example_inputs()))), _outputs(big(*_args(ref.example_inputs())))
    assert [u.shape for u in a] == [v.shape for v in b]


def test_zoo_covers_every_op() -> None:
    models = {n: r.build() for n, r in REFERENCE_MODELS.items()}
    kinds = {type(m) for model in models.values() for m in model.modules()}
    for k in (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm,
              nn.Embedding, nn.MultiheadAttention, nn.Linear, nn.Dropout, nn.MaxPool2d, nn.MaxPool1d,
              nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.ReLU6, nn.Flatten, nn.Sigmoid):
        assert k in kinds, k
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for model in models.values()
               for m in model.modules()), "a depthwise conv"
    assert any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels for model in models.values()
               for m in model.modules()), "a grouped (not depthwise) conv"
    gpt = models["gpt"]
    assert gpt.lm_head.weight is gpt.tok.weight, "weight tying"
    attn = gpt.blocks[0].attn
    assert isinstance(attn.num_heads, int) and attn.head_dim * attn.num_heads == attn.query.out_features
    assert isinstance(models["convnext"].blocks[0].gamma, nn.Parameter), "layer-scale parameter"
    ops = {n.target for model in models.values() for n in fx.symbolic_trace(model).graph.nodes}
    methods = {str(t) for t in ops if isinstance(t, str)}
    for op in (torch.cat, torch.chunk, torch.split, torch.matmul, torch.softmax, torch.flatten, torch.sigmoid):
        assert op in ops, op
    for meth in ("view", "transpose", "permute", "reshape", "mean"):
        assert meth in methods, meth
    covers = {c for r in REFERENCE_MODELS.values() for c in r.covers}
    for c in ("squeeze-excitation", "layer-scale parameter", "weight tying", "hand-written attention",
              "channels-last permute", "latent bottleneck", "several inputs", "several outputs", "skip cat",
              "grouped Conv2d"):
        assert c in covers, c


def test_two_heads_takes_two_inputs_and_returns_two_outputs() -> None:
    ref = REFERENCE_MODELS["two_heads"]
    x = ref.example_inputs()
    assert isinstance(x, tuple) and len(x) == 2
    with torch.no_grad():
        y = ref.build()(*x)
    assert isinstance(y, tuple) and [t.shape for t in y] == [(2, 3), (2, 1)]

"""Complexity-aware training slices dead units out of the model it trains, and removes dead layers.

Every check is against an independent computation: a narrower model built by hand, Adam/SGD run
on hand-sliced tensors and state, the polynomial's params, FlopCounterMode on the result.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from training_fixtures import two_layer_mlp

from secateurs.apply import ZeroWidthConv2d, apply
from secateurs.cost import CostModel, Polynomial
from secateurs.errors import ValidationError
from secateurs.graph import build, dense_counts
from secateurs.graph.groups import Group, Member
from secateurs.models.reference import REFERENCE_MODELS
from secateurs.training.complexity import ComplexityAware

DEAD = {"h1": [1, 4, 5, 9], "h2": [0, 15]}
ALIVE = {g: [i for i in range(16) if i not in d] for g, d in DEAD.items()}


def _decided(ca: ComplexityAware, dead: dict[str, list[int]]) -> None:
    """Gates at exactly 1 (samples are 1: the forward is deterministic) except ``dead`` at 0."""
    with torch.no_grad():
        for g, theta in ca.theta.items():
            theta.fill_(1.0)
            theta[dead.get(g, [])] = 0.0


def _narrow_by_hand(model: nn.Module) -> nn.Sequential:
    """The MLP without the DEAD units, sliced by hand from ``model``'s (unparametrised) weights."""
    a, b = ALIVE["h1"], ALIVE["h2"]
    small = nn.Sequential(nn.Linear(6, len(a)), nn.ReLU(), nn.Linear(len(a), len(b)), nn.ReLU(), nn.Linear(len(b), 3))
    with torch.no_grad():
        small[0].weight.copy_(model[0].weight[a])
        small[0].bias.copy_(model[0].bias[a])
        small[2].weight.copy_(model[2].weight[b][:, a])
        small[2].bias.copy_(model[2].bias[b])
        small[4].weight.copy_(model[4].weight[:, b])
        small[4].bias.copy_(model[4].bias)
    return small


def test_compaction_keeps_the_forward_and_shrinks_parameters_as_counted() -> None:
    model, groups, cost = two_layer_mlp()
    ca = ComplexityAware(model, groups, cost, strength=0.0, lr=1e-9)
    ids = [id(p) for p in ca.model.parameters()]
    _decided(ca, DEAD)
    x = torch.randn(8, 6)
    ca.model.eval()
    before_eval = ca.model(x)
    ca.model.train()
    before_train = ca.model(x)
    ca.step()  # the dead gates are found dead and sliced out
    assert [p.shape[0] for p in (ca.model[0].bias, ca.model[2].bias)] == [12, 14]
    assert sum(p.numel() for p in ca.model.parameters()) == cost.params.evaluate({"h1": 12, "h2": 14})
    assert [id(p) for p in ca.model.parameters()] == ids  # the optimiser's parameters are still the model's
    assert ca.present["h1"].tolist() == ALIVE["h1"] and ca.current["h1"].size == 12
    torch.testing.assert_close(ca.model(x), before_train)
    ca.model.eval()
    torch.testing.assert_close(ca.model(x), before_eval)
    torch.testing.assert_close(ca.model(x), _narrow_by_hand(model)(x))  # the untouched input model, sliced by hand
    assert float(ca.expected("params").detach()) == cost.params.evaluate({"h1": 12, "h2": 14})
    assert not ca.compact()  # nothing new died


def _opt_adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


def _opt_sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-2, momentum=0.9)


@pytest.mark.parametrize("make", [_opt_adam, _opt_sgd])
def test_optimizer_step_after_compaction_matches_one_on_hand_sliced_state(
        make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
    model, groups, cost = two_layer_mlp()
    ca = ComplexityAware(model, groups, cost, strength=0.0, lr=1e-9)
    _decided(ca, {})
    opt = make(list(ca.model.parameters()))
    torch.manual_seed(3)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    layers = {0: ("h1", None), 2: ("h2", "h1"), 4: (None, "h2")}  # module -> (group of rows, group of columns)
    for step in range(2):
        loss = nn.functional.cross_entropy(ca.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1:  # compaction at this step's end, the user's `loss` still holding its graph
            snapshot = {i: {"weight": _weights(ca.model[i]).detach().clone(), "bias": ca.model[i].bias.detach().clone()}
                        for i in layers}
            state = {(i, n): copy.deepcopy(opt.state[p]) for i in layers for n, p in _named(ca.model[i])}
            _decided(ca, DEAD)
        ca.step()
    assert ca.present["h1"].numel() == 12
    assert all(p.grad is None or p.grad.shape == p.shape for p in ca.model.parameters())
    # the reference: the hand-sliced narrower model, a fresh optimiser given the hand-sliced state
    ref = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 14), nn.ReLU(), nn.Linear(14, 3))
    ref_opt = make(list(ref.parameters()))

    def cut(value: torch.Tensor, i: int, name: str) -> torch.Tensor:
        rows, cols = layers[i]
        if value.dim() == 0:
            return value.clone()
        if rows is not None:
            value = value[ALIVE[rows]]
        if name == "weight" and cols is not None:
            value = value[:, ALIVE[cols]]
        return value.clone()

    with torch.no_grad():
        for i in layers:
            for name, p in _named(ref[i]):
                p.copy_(cut(snapshot[i][name], i, name))
                ref_opt.state[p] = {k: cut(v, i, name) if isinstance(v, torch.Tensor) else v
                                    for k, v in state[(i, name)].items()}
    for model_, optimizer in ((ca.model, opt), (ref, ref_opt)):
        loss = nn.functional.cross_entropy(model_(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for i in layers:
        torch.testing.assert_close(_weights(ca.model[i]), ref[i].weight)
        torch.testing.assert_close(ca.model[i].bias, ref[i].bias)
        for name, p in _named(ca.model[i]):
            for key, value in opt.state[p].items():
                ref_value = ref_opt.state[dict(_named(ref[i]))[name]][key]
                torch.testing.assert_close(value, ref_value)


def _weights(module: nn.Module) -> torch.Tensor:
    """The raw weight (the parametrisation's original while gates are installed)."""
    if hasattr(module, "parametrizations"):
        return module.parametrizations.weight.original
    return module.weight


def _named(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [("weight", _weights(module)), ("bias", module.bias)]


def test_compaction_off_and_errors() -> None:
    model, groups, cost = two_layer_mlp()
    ca = ComplexityAware(model, groups, cost, strength=0.0, lr=1e-9, compact=0)
    _decided(ca, DEAD)
    ca.step()
    assert ca.model[0].bias.shape == (16,) and ca.dead["h1"].sum() == 4
    with pytest.raises(ValidationError, match=r"compact: must be a non-negative number of steps, got -1"):
        ComplexityAware(model, groups, cost, compact=-1)
    ca.close()
    with pytest.raises(ValidationError, match=r"compact: this ComplexityAware was finalized or closed"):
        ca.compact()


def test_final_plan_in_original_indices_reproduces_the_trained_model() -> None:
    model, groups, cost = two_layer_mlp()
    ca = ComplexityAware(model, groups, cost, strength=0.2, flatten=0.3, lr=0.1, init=0.6)
    torch.manual_seed(1)
    x = torch.randn(256, 6)
    y = x[:, :3].argmax(1)
    opt = torch.optim.Adam(ca.model.parameters(), 1e-2)
    for _ in range(80):
        loss = nn.functional.cross_entropy(ca.model(x), y) + ca.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ca.step()
    present = {g: ca.present[g].tolist() for g in ca.theta}
    assert all(len(units) < 16 for units in present.values())  # training ran narrower
    assert ca.model[0].bias.shape[0] == len(present["h1"])
    ca.model.eval()
    trained = ca.model(x)
    raw = ca.model[0].weight.detach().clone()  # h1's producer rows, trained
    plan = ca.finalize()
    assert all(set(units) <= set(present[g]) for g, units in plan.keep.items())
    # the trained copy is widened back: trained values where units are present, zeros where cut
    full = ca.model[0].weight
    assert full.shape == (16, 6) and torch.equal(full[present["h1"]], raw)
    assert not full[[i for i in range(16) if i not in present["h1"]]].any()
    small = apply(ca.model, plan).eval()
    torch.testing.assert_close(small(x), trained)
    structure = apply(model, plan)  # the plan's indices are the original model's
    assert {k: v.shape for k, v in structure.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    structure.load_state_dict(small.state_dict())
    torch.testing.assert_close(structure.eval()(x), trained)
    assert sum(p.numel() for p in small.parameters()) == cost(plan.kept_counts()).params


def _resnet() -> tuple[nn.Module, torch.Tensor]:
    ref = REFERENCE_MODELS["resnet_basic"]
    model = ref.build()
    with torch.no_grad():  # visible batch-norm constants, so a wrong branch output would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
                m.momentum = 0.0  # training forwards leave the running statistics as they are
    return model, ref.example_inputs()


def test_dead_layer_removes_the_residual_branch_while_training_and_in_the_plan() -> None:
    model, x = _resnet()
    graph = build(model, x)
    ca = ComplexityAware.from_graph(model, graph, strength=0.0, lr=1e-9)
    assert ca.layer_of == {"layer1.conv1:out": "layer1", "layer2.conv1:out": "layer2"}
    _decided(ca, {"stem.0:out": [2]})
    ca.model.eval()
    with torch.no_grad():
        ca.layer_theta["layer1"].zero_()
        ca.layer_theta["layer2"].fill_(1.0)  # decided: the training forward draws no random gate
        before_eval = ca.model(x)
        ca.model.train()
        before_train = ca.model(x)  # batch statistics: the output does not depend on running stats
    ca.step()
    assert ca.layer_dead["layer1"] and "layer1.conv1:out" not in ca.current
    assert isinstance(ca.model.layer1.conv1, ZeroWidthConv2d) and ca.model.layer1.conv1.out_channels == 0
    keep = {"layer1.conv1:out": 0, "stem.0:out": 7}
    counted = dense_counts(ca.model, x)  # gates are elementwise scales: FlopCounterMode sees the convs only
    assert counted == graph.cost(keep)
    with torch.no_grad():
        torch.testing.assert_close(ca.model(x), before_train)
        ca.model.eval()
        torch.testing.assert_close(ca.model(x), before_eval)
        ca.model.train()
    loss = ca.model(x).sum() + ca.penalty()
    loss.backward()  # trains through the zero-width branch
    assert float(ca.expected("params").detach()) == pytest.approx(graph.cost(keep).params)
    ca.model.eval()
    with torch.no_grad():
        trained = ca.model(x)
    plan = ca.finalize()
    assert plan.allow_empty == ["layer1.conv1:out"] and plan.keep["layer1.conv1:out"] == []
    small = apply(ca.model, plan, graph=graph)
    assert dense_counts(small, x) == graph.cost(plan.kept_counts())
    torch.testing.assert_close(small(x), trained)
    apply(model, plan, graph=graph)  # the plan applies to the original model too


def test_layer_at_most_half_is_removed_by_the_plan() -> None:
    model, x = _resnet()
    graph = build(model, x)
    ca = ComplexityAware.from_graph(model, graph, strength=0.0, lr=1e-9, layers={"layer2": ["layer2.conv1:out"]})
    assert ca.layer_of == {"layer2.conv1:out": "layer2"}
    _decided(ca, {})
    with torch.no_grad():
        ca.layer_theta["layer2"].fill_(0.4)
    ca.step()
    ca.model.eval()
    with torch.no_grad():
        rounded = ca.model(x)  # eval: every unit of the layer is off (0.4 ≤ ½)
    plan = ca.finalize()
    assert plan.keep == {"layer2.conv1:out": []}
    torch.testing.assert_close(apply(ca.model, plan, graph=graph)(x), rounded)


def test_hard_budget_with_a_dead_layer_meets_the_budget_with_the_others() -> None:
    model, x = _resnet()
    graph = build(model, x)
    ca = ComplexityAware.from_graph(model, graph, budget={"flops": 0.5}, lr=1e-9)
    _decided(ca, {})
    with torch.no_grad():
        ca.layer_theta["layer1"].zero_()
    ca.step()
    plan = ca.finalize()
    assert plan.keep["layer1.conv1:out"] == [] and plan.kept_counts().get("layer2.conv1:out", 12) >= 1
    small = apply(ca.model, plan, graph=graph)
    assert dense_counts(small, x).flops <= 0.5 * graph.cost().flops
    assert dense_counts(small, x) == graph.cost(plan.kept_counts())


def test_compacted_training_takes_the_same_steps_as_gated_training() -> None:
    """Slicing is only an optimisation: same gate draws, same θ, same weights on the live units."""
    runs = []
    for compact in (1, 0):
        model, groups, cost = two_layer_mlp()
        ca = ComplexityAware(model, groups, cost, budget={"flops": 0.3}, lr=0.1, flatten=0.2, compact=compact)
        torch.manual_seed(1)
        x = torch.randn(256, 6)
        y = x[:, :3].argmax(1)
        opt = torch.optim.Adam(ca.model.parameters(), 1e-2)
        for _ in range(30):
            loss = nn.functional.cross_entropy(ca.model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ca.step()
        runs.append(ca)
    sliced, gated = runs
    assert sliced.model[0].bias.shape[0] < 16 and gated.model[0].bias.shape[0] == 16
    for g in sliced.theta:
        assert torch.equal(sliced.dead[g], gated.dead[g])
        torch.testing.assert_close(sliced.theta[g], gated.theta[g])
    a, b = sliced.present["h1"], sliced.present["h2"]
    torch.testing.assert_close(sliced.model[0].weight, gated.model[0].weight[a])
    torch.testing.assert_close(_weights(sliced.model[2]), _weights(gated.model[2])[b][:, a])
    assert sliced.finalize().keep == gated.finalize().keep


def _normed() -> tuple[nn.Module, list[Group], CostModel]:
    """The MLP with a LayerNorm on h1: gating h1's units is not slicing them (they weigh in its statistics)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    groups = [Group("h1", 16, [Member("0", "weight", 0, "producer"), Member("0", "bias", 0), Member("1", "weight", 0),
                               Member("1", "bias", 0), Member("3", "weight", 1, "consumer")]),
              Group("h2", 16, [Member("3", "weight", 0, "producer"), Member("3", "bias", 0),
                               Member("5", "weight", 1, "consumer")])]
    # params: 6h1 + h1 + 2h1 + h1h2 + h2 + 3h2 + 3; FLOPs 2(6h1 + h1h2 + 3h2)
    cost = CostModel(Polynomial(3, {"h1": 9, "h2": 4}, {("h1", "h2"): 1}),
                     Polynomial(0, {"h1": 12, "h2": 6}, {("h1", "h2"): 2}), {"h1": 16, "h2": 16})
    return model, groups, cost


def test_groups_through_a_layernorm_are_emptied_but_never_narrowed() -> None:
    model, groups, cost = _normed()
    ca = ComplexityAware(model, groups, cost, strength=0.0, lr=1e-9, layers={"block": ["h1"]})
    _decided(ca, DEAD)
    with torch.no_grad():
        ca.layer_theta["block"].fill_(1.0)
    x = torch.randn(8, 6)
    ca.model.eval()
    before = ca.model(x)
    ca.step()
    assert ca.present["h1"].numel() == 16 and ca.present["h2"].numel() == 14  # h2 narrowed, h1 only gated
    torch.testing.assert_close(ca.model(x), before)
    with torch.no_grad():
        ca.layer_theta["block"].zero_()
        before = ca.model(x)
    ca.step()  # the layer died: emptying h1 is exact (its consumer reads nothing either way)
    assert ca.model[0].out_features == 0 and ca.model[1].normalized_shape == (0,)
    torch.testing.assert_close(ca.model(x), before)
    plan = ca.finalize()
    assert plan.keep["h1"] == [] and ca.model[1].normalized_shape == (16,)
    torch.testing.assert_close(apply(ca.model, plan).eval()(x), before)


def test_layers_must_be_able_to_run_at_zero_width() -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.PReLU(4), nn.Linear(4, 3))
    model[1] = nn.ConvTranspose1d(4, 4, 1)  # a stand-in module that apply cannot leave at zero width
    group = Group("h", 4, [Member("0", "weight", 0, "producer"), Member("1", "weight", 0),
                           Member("2", "weight", 1, "consumer")])
    cost = CostModel(Polynomial(0, {"h": 1.0}), Polynomial(0, {"h": 1.0}), {"h": 4})
    with pytest.raises(ValidationError, match=r"layers: layer 'b': group 'h' reaches ConvTranspose1d '1', which cannot "
                                              r"run at zero width"):
        ComplexityAware(model, [group], cost, layers={"b": ["h"]})


def _attributes(module: nn.Module) -> dict[str, object]:
    return {k: v for k, v in vars(module).items() if isinstance(v, (int, tuple)) and not k.startswith("_")}


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_two_compactions_keep_the_forward_and_close_restores_every_module(name: str) -> None:
    """On every reference model (cat offsets, flattened blocks, heads, grouped convs, norms): two
    rounds of deaths, each compaction keeps the eval forward; closing gives back the original shapes,
    classes and size attributes."""
    ref = REFERENCE_MODELS[name]
    model, x = ref.build(), ref.example_inputs()
    args = x if isinstance(x, tuple) else (x,)
    ca = ComplexityAware.from_graph(model, build(model, x), strength=0.0, lr=1e-9)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    torch.manual_seed(0)
    for _ in range(2):
        with torch.no_grad():
            for theta in ca.theta.values():
                alive = torch.nonzero(theta > 0).reshape(-1)
                theta[alive] = 1.0
                theta[alive[torch.randperm(alive.numel())[: alive.numel() // 3]]] = 0.0
            for theta in ca.layer_theta.values():
                theta.fill_(1.0)
        ca.model.eval()
        with torch.no_grad():
            before = first(ca.model(*args))
        ca.step()
        with torch.no_grad():
            torch.testing.assert_close(first(ca.model(*args)), before, rtol=1e-4, atol=1e-5)
    assert any(ca.present[g].numel() < grp.size for g, grp in ca.groups.items())
    ca.close()
    assert {k: v.shape for k, v in ca.model.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    for mine, theirs in zip(ca.model.modules(), model.modules(), strict=True):
        assert type(mine) is type(theirs) and _attributes(mine) == _attributes(theirs)

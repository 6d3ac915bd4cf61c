"""`--teacher auto` picks the teacher from the two base models' bits per byte on the calibration
text: blend when the source base is the weaker model, else source (teacher_choice.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_docs
from peft import LoraConfig, get_peft_model

from castlora.evaluate import text_loss
from castlora.models import load_model, load_tokenizer
from castlora import teacher_choice
from castlora.teacher_choice import bits_per_byte, choose_teacher


@pytest.fixture(scope="module")
def texts():
    return [d[:1200] for d in read_docs("data", "general", "valid.txt.gz", n=24)]


def _peft(path):  # a PeftModel as translate holds the source (a fresh LoRA: B = 0)
    return get_peft_model(load_model(str(path)), LoraConfig(r=4, target_modules="all-linear")).eval()


def test_bits_per_byte_is_the_total_loss_over_the_bytes(zoo, texts):
    model, tok = load_model(str(zoo("llama"))), load_tokenizer(str(zoo("llama")))
    scored = text_loss(model, tok, texts, seq_len=512)
    want = scored["mean_loss"] * scored["tokens"] / math.log(2) / sum(len(t.encode()) for t in texts)
    assert bits_per_byte(model, tok, texts, 512) == pytest.approx(want)
    # near the zoo manifest's general/valid figure (1.592 bits per byte over the whole file)
    assert 1.3 < want < 1.9


def test_auto_picks_blend_only_from_the_weaker_source(zoo, texts, monkeypatch):
    llama, neox = load_model(str(zoo("llama"))), load_model(str(zoo("neox")))
    tok_l, tok_n = load_tokenizer(str(zoo("llama"))), load_tokenizer(str(zoo("neox")))
    with torch.no_grad():
        weaker_source, info = choose_teacher(_peft(zoo("neox")), tok_n, llama, tok_l, texts, 512)
    assert weaker_source == "blend" and info["source_bits_per_byte"] > info["target_bits_per_byte"] * 1.01
    stronger_source, info = choose_teacher(_peft(zoo("llama")), tok_l, neox, tok_n, texts, 512)
    assert stronger_source == "source" and info["source_bits_per_byte"] < info["target_bits_per_byte"]
    # a source weaker by less than the margin keeps the source teacher: 32 texts cannot tell
    monkeypatch.setattr(teacher_choice, "MARGIN", 1.0)
    assert choose_teacher(_peft(zoo("neox")), tok_n, llama, tok_l, texts, 512)[0] == "source"
    monkeypatch.setattr(teacher_choice, "MARGIN", 0.01)
    same, info = choose_teacher(_peft(zoo("llama")), tok_l, llama, tok_l, texts, 512)
    assert same == "source" and info["source_bits_per_byte"] == pytest.approx(info["target_bits_per_byte"])

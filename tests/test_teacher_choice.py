"""`--teacher auto` picks the teacher from the two base models' bits per byte on whole documents:
blend when the source base is the weaker model, else source (teacher_choice.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_docs, shared_path
from peft import LoraConfig, get_peft_model

from castlora.corpus import read_corpus
from castlora.evaluate import text_loss
from castlora.models import load_model, load_tokenizer
from castlora import teacher_choice
from castlora.teacher_choice import bits_per_byte, choose_teacher, strength_texts


@pytest.fixture(scope="module")
def texts():
    return [d[:1200] for d in read_docs("data", "general", "valid.txt.gz", n=24)]


def _peft(path):  # a PeftModel as translate holds the source (a fresh LoRA: B = 0)
    return get_peft_model(load_model(str(path)), LoraConfig(r=4, target_modules="all-linear")).eval()


def test_bits_per_byte_is_the_total_loss_over_the_bytes(zoo, texts):
    model, tok = load_model(str(zoo("llama"))), load_tokenizer(str(zoo("llama")))
    scored = text_loss(model, tok, texts, seq_len=512, doc_start=True)
    want = scored["mean_loss"] * scored["tokens"] / math.log(2) / sum(len(t.encode()) for t in texts)
    assert bits_per_byte(model, tok, texts, 512) == pytest.approx(want)
    # near the zoo manifest's general/valid figure (1.592 bits per byte over the whole file)
    assert 1.3 < want < 1.9


def test_every_token_of_every_text_is_scored_by_any_tokenizer(zoo, texts):
    # neox's GPT-2 tokenizer adds no BOS: without the document-start token its first token of each
    # text would go unscored and it would look stronger than it is on short texts
    for name in ("llama", "neox"):
        model, tok = load_model(str(zoo(name))), load_tokenizer(str(zoo(name)))
        n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
        assert text_loss(model, tok, texts, seq_len=64, doc_start=True)["tokens"] == n_tokens
    assert load_tokenizer(str(zoo("neox"))).bos_token_id in (None, load_tokenizer(str(zoo("neox"))).eos_token_id)


def test_strength_texts_are_whole_documents_in_a_seeded_order():
    docs = [f"document {i} " * (i + 1) for i in range(50)] + ["x" * (3 * teacher_choice.DOC_CHARS), "  "]
    picked = strength_texts(docs, seed=0)
    assert picked == strength_texts(docs, seed=0) and picked != strength_texts(docs, seed=1)
    assert all(t.strip() for t in picked) and len(picked) == 51  # all but the blank one: under the budget
    assert max(map(len, picked)) == teacher_choice.DOC_CHARS  # a long document is cut
    many = [f"doc {i}: " + "word " * 400 for i in range(1000)]
    budget = strength_texts(many, seed=0)
    assert sum(map(len, budget)) >= teacher_choice.STRENGTH_CHARS > sum(map(len, budget[:-1]))


def test_held_out_text_tells_mistral_is_weaker_than_llama(zoo):
    # the case --strength-corpus is for: on general/valid, which the zoo models did not train on,
    # mistral spends more bits than llama (zoo manifest: 1.644 against 1.592), so auto takes the blend
    valid = strength_texts(read_corpus([str(shared_path("data", "general", "valid.txt.gz"))]), seed=0)
    llama, tok_l = load_model(str(zoo("llama"))), load_tokenizer(str(zoo("llama")))
    teacher, info = choose_teacher(_peft(zoo("mistral")), load_tokenizer(str(zoo("mistral"))), llama, tok_l,
                                   valid, 192)
    assert teacher == "blend" and info["source_bits_per_byte"] > info["target_bits_per_byte"] * 1.01


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

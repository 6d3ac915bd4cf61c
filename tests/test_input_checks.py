"""Input checks that run before any model loads or anything is written: output paths, adapters, corpora,
prompts and examples files, model folders. Every refusal is a one-line CastloraError naming the problem."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import stat
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from castlora import corpus as corpus_mod
from castlora.adapters import check_adapter, read_adapter_folder
from castlora.corpus import check_corpus_path, read_corpus, read_documents, read_prompts
from castlora.errors import AdapterMismatchError, CastloraError, CastloraWarning, CorpusError
from castlora.evaluate import is_examples_file, load_examples
from castlora.input_checks import check_output_path
from castlora.models import check_model_path
from castlora.safe_io import atomic_folder

PREFIX = "base_model.model.model.layers"


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------ --out


@pytest.fixture
def inputs(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    model = tmp_path / "models" / "llama"
    model.mkdir(parents=True)
    corpus = tmp_path / "data" / "c.txt"
    corpus.parent.mkdir()
    corpus.write_text("text")
    return {"--adapter": adapter, "--source": model, "--target": "org/hub-model", "--corpus": [corpus],
            "--teacher-cache": None}


def test_out_that_is_the_adapter_folder_is_refused(inputs):
    with pytest.raises(CastloraError) as e:
        check_output_path(inputs["--adapter"], inputs)
    assert "is the --adapter folder" in _one_line(e) and "choose another --out" in str(e.value)


def test_out_inside_an_input_folder_is_refused(inputs):
    with pytest.raises(CastloraError, match="lies inside the --source folder"):
        check_output_path(inputs["--source"] / "ported", inputs)


def test_out_that_contains_an_input_is_refused(inputs, tmp_path):
    with pytest.raises(CastloraError, match="contains the --corpus file"):
        check_output_path(tmp_path / "data", inputs)
    with pytest.raises(CastloraError, match="contains the --source folder"):
        check_output_path(tmp_path / "models", inputs)


def test_out_reaching_an_input_through_a_symlink_is_refused(inputs, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(inputs["--adapter"])
    with pytest.raises(CastloraError, match="is the --adapter folder"):
        check_output_path(link, inputs)
    (tmp_path / "models_link").symlink_to(tmp_path / "models")
    with pytest.raises(CastloraError, match="lies inside the --source folder"):
        check_output_path(tmp_path / "models_link" / "llama" / "out", inputs)


def test_hub_ids_and_missing_inputs_are_ignored_and_a_new_folder_is_accepted(inputs, tmp_path):
    check_output_path(tmp_path / "runs" / "ported", inputs)
    check_output_path(tmp_path / "org" / "hub-model", inputs)  # the --target hub id is not a local path


def test_the_current_directory_is_refused_as_out(inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "data")
    for out in (".", "./", str(tmp_path / "data")):
        with pytest.raises(CastloraError, match="is the current directory"):
            check_output_path(out, {})
    with pytest.raises(CastloraError, match="contains the current directory"):
        check_output_path(tmp_path, {})


def test_a_filesystem_root_or_the_home_directory_is_refused_as_out(tmp_path, monkeypatch):
    with pytest.raises(CastloraError, match="filesystem root"):
        check_output_path("/", {})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with pytest.raises(CastloraError, match="is the home directory"):
        check_output_path("~", {})
    with pytest.raises(CastloraError, match="contains the home directory"):
        check_output_path(tmp_path, {})


def test_a_dangling_out_symlink_is_refused_by_name(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(CastloraError) as e:
        check_output_path(link, {})
    assert f"--out {link} is a dangling symlink" in _one_line(e) and "gone" in str(e.value)


# ------------------------------------------------------------------ atomic_folder


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_overwriting_a_symlinked_out_replaces_the_link_and_leaves_its_target_alone(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("keep")
    out = tmp_path / "out"
    out.symlink_to(target)
    with pytest.raises(CastloraError, match="already exists .a symlink"):
        with atomic_folder(out):
            pass
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert not out.is_symlink() and _entries(out) == ["new"]
    assert _entries(target) == ["keep"]
    assert _entries(tmp_path) == ["elsewhere", "out"]  # no .out.old-* link left behind


def test_a_dangling_symlink_out_is_replaced_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "gone")
    with pytest.raises(CastloraError, match="already exists"):
        with atomic_folder(out):
            pass
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "a").write_text("a")
    assert out.is_dir() and not out.is_symlink() and _entries(tmp_path) == ["out"]


def test_replacing_a_folder_or_a_file_leaves_no_old_debris(tmp_path):
    out = tmp_path / "out"
    (out / "ro").mkdir(parents=True)
    (out / "ro" / "f").write_text("f")
    os.chmod(out / "ro", 0o500)  # a read-only folder inside the previous output
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "a").write_text("a")
    assert _entries(out) == ["a"] and _entries(tmp_path) == ["out"]
    f = tmp_path / "file_out"
    f.write_text("a file where the folder goes")
    with atomic_folder(f, overwrite=True) as tmp:
        (tmp / "a").write_text("a")
    assert f.is_dir() and _entries(tmp_path) == ["file_out", "out"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_the_output_folder_gets_the_default_mode_of_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "a").write_text("a")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask


# ------------------------------------------------------------------ adapters


def _lora(modules=(("0", "q_proj"),), r=4, d=8, scale_b=0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {}
    for layer, name in modules:
        t[f"{PREFIX}.{layer}.self_attn.{name}.lora_A.weight"] = torch.randn(r, d, generator=g)
        t[f"{PREFIX}.{layer}.self_attn.{name}.lora_B.weight"] = scale_b * torch.randn(d, r, generator=g)
    return t


def _config(**kw) -> dict:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": "tiny/llama", **kw}


def _folder(path: Path, config, tensors) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_a_real_peft_adapter_passes_without_warnings(tmp_path):
    from conftest import make_tiny
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(make_tiny("llama"), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                       target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    pm.save_pretrained(str(tmp_path / "a"))
    seen: list[str] = []
    config, tensors = read_adapter_folder(tmp_path / "a", warn=seen.append)
    assert seen == [] and len(tensors) == 4 and check_adapter(config, tensors) == []


@pytest.mark.parametrize("config, says", [
    ([], "holds a JSON list, not an object"),
    (_config(r=0), "r must be a positive integer, not 0"),
    (_config(r="8"), "r must be a positive integer, not '8'"),
    (_config(r=True), "r must be a positive integer"),
    ({k: v for k, v in _config().items() if k != "r"}, "no rank r"),
    (_config(lora_alpha="big"), "lora_alpha must be a finite number"),
    (_config(target_modules=None), "target_modules must be"),
    (_config(target_modules=[3]), "target_modules must be"),
    (_config(target_modules="(q_proj"), "target_modules '\\(q_proj' is not a valid regular expression"),
    (_config(peft_type="IA3"), "peft_type 'IA3' is not a LoRA"),
    (_config(use_dora=True), "DoRA adapters are not supported"),
    (_config(modules_to_save=["lm_head"]), "modules_to_save"),
    (_config(rank_pattern={"q_proj": -1}), "rank_pattern\\['q_proj'\\] must be a positive integer"),
    (_config(alpha_pattern=[1]), "alpha_pattern must be an object"),
    (_config(layers_to_transform="0"), "layers_to_transform must be"),
])
def test_a_bad_adapter_config_is_refused_naming_the_field(config, says):
    with pytest.raises(CastloraError, match=says) as e:
        check_adapter(config, _lora(), where="ad")
    assert _one_line(e).startswith("ad: ")


def test_tensors_of_modules_outside_target_modules_are_refused_naming_them():
    tensors = _lora([("0", "q_proj"), ("0", "v_proj"), ("1", "v_proj")])
    with pytest.raises(CastloraError) as e:
        check_adapter(_config(target_modules=["q_proj"]), tensors)
    msg = _one_line(e)
    assert "model.layers.0.self_attn.v_proj, model.layers.1.self_attn.v_proj" in msg and "['q_proj']" in msg
    assert "q_proj.lora" not in msg


def test_layers_to_transform_and_regex_target_modules_are_matched_like_peft():
    tensors = _lora([("0", "q_proj"), ("1", "q_proj")])
    with pytest.raises(CastloraError, match="layers_to_transform \\[1\\] does not select: model.layers.0"):
        check_adapter(_config(layers_to_transform=[1]), tensors)
    assert check_adapter(_config(layers_to_transform=[0, 1]), tensors) == []
    assert check_adapter(_config(target_modules=r".*\.q_proj"), tensors) == []
    with pytest.raises(CastloraError, match="does not select"):
        check_adapter(_config(target_modules=r".*\.v_proj"), tensors)
    with pytest.raises(CastloraError, match="does not select: model.layers.1"):
        check_adapter(_config(exclude_modules=["model.layers.1.self_attn.q_proj"]), tensors)


def test_a_rank_that_differs_from_r_or_rank_pattern_is_refused():
    tensors = {**_lora([("0", "q_proj")], r=4), **_lora([("0", "v_proj")], r=2)}
    with pytest.raises(CastloraError, match="v_proj has rank 2 but adapter_config.json says r=4"):
        check_adapter(_config(), tensors)
    assert check_adapter(_config(rank_pattern={"v_proj": 2}), tensors) == []
    with pytest.raises(CastloraError, match="q_proj has rank 4 but adapter_config.json says rank_pattern=8"):
        check_adapter(_config(rank_pattern={"v_proj": 2, "q_proj": 8}), tensors)


def test_a_without_its_b_or_mismatched_shapes_are_refused():
    tensors = _lora()
    del tensors[f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"]
    with pytest.raises(AdapterMismatchError, match="layers.0.self_attn.q_proj: has lora_B missing"):
        check_adapter(_config(), tensors)
    tensors = _lora()
    tensors[f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(8, 3)
    with pytest.raises(CastloraError, match=r"lora_A \(4, 8\) and lora_B \(8, 3\) do not fit"):
        check_adapter(_config(), tensors)
    tensors[f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(8, 4, 1)
    with pytest.raises(CastloraError, match="not a 2-D matrix"):
        check_adapter(_config(), tensors)
    with pytest.raises(CastloraError, match="hold no LoRA tensors"):
        check_adapter(_config(), {})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nan_or_inf_weight_is_refused_naming_the_tensor(bad):
    tensors = _lora()
    key = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    tensors[key][1, 2] = bad
    with pytest.raises(CastloraError, match="NaN/inf") as e:
        check_adapter(_config(), tensors)
    assert key in _one_line(e)


def test_a_huge_delta_warns_and_an_overflowing_delta_is_refused():
    assert check_adapter(_config(), _lora()) == []
    warns = check_adapter(_config(), _lora(scale_b=1e5))
    assert len(warns) == 1 and "layers.0.self_attn.q_proj" in warns[0] and "is huge" in warns[0]
    assert check_adapter(_config(), _lora(scale_b=1e5), huge_norm=1e12) == []
    with pytest.raises(CastloraError, match="overflows float32"):
        check_adapter(_config(lora_alpha=1e10), _lora(scale_b=1e30))
    with pytest.raises(CastloraError, match="overflows float32"):
        check_adapter(_config(lora_alpha=1e300), _lora())


def test_read_adapter_folder_runs_the_checks_and_reports_warnings(tmp_path):
    bad = _folder(tmp_path / "list", [], _lora())
    with pytest.raises(CastloraError, match=f"{bad}: adapter_config.json holds a JSON list"):
        read_adapter_folder(bad)
    wrong = _folder(tmp_path / "wrong", _config(target_modules=["k_proj"]), _lora())
    with pytest.raises(CastloraError, match="does not select: model.layers.0.self_attn.q_proj"):
        read_adapter_folder(wrong)
    huge = _folder(tmp_path / "huge", _config(), _lora(scale_b=1e5))
    seen: list[str] = []
    read_adapter_folder(huge, warn=seen.append)
    assert len(seen) == 1 and str(huge) in seen[0]
    with pytest.warns(CastloraWarning, match="is huge"):
        read_adapter_folder(huge)


# ------------------------------------------------------------------ corpus, prompts, examples


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.mark.parametrize("line, says", [
    ("42", "is a JSON int, not an object"),
    ('["a"]', "is a JSON list, not an object"),
    ('{"text": null}', "field 'text' is null, not a string"),
    ('{"text": 3}', "field 'text' is 3, not a string"),
    ('{"prompt": "a", "completion": 7}', "field 'completion' is 7, not a string"),
    ("{broken", "is not a JSON line"),
])
def test_a_bad_jsonl_line_is_refused_naming_file_and_line(tmp_path, line, says):
    f = _write(tmp_path / "c.jsonl", '{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(CorpusError, match=says) as e:
        read_documents(f)
    assert f"{f}:3" in _one_line(e)


def test_a_non_string_prompt_is_refused_in_the_prompts_file(tmp_path):
    f = _write(tmp_path / "p.jsonl", '{"prompt": null}\n')
    with pytest.raises(CorpusError, match=f"{f}:1: field 'prompt' is null"):
        read_prompts([str(f)])


@pytest.mark.parametrize("data, says", [
    (b"\0" * 100, "NUL characters only"),
    (b"text " * 20 + b"\x01\x02", "2 NUL/control characters in 102 bytes"),
    (b'{"text": "\\u0000\\u0000\\u0000"}\n', "NUL characters only"),
])
def test_content_that_is_not_text_is_refused(tmp_path, data, says):
    f = _write(tmp_path / ("c.jsonl" if data.startswith(b"{") else "c.txt"), data)
    with pytest.raises(CorpusError, match=says) as e:
        read_documents(f)
    assert str(f) in _one_line(e)


def test_text_with_tabs_and_a_rare_control_character_is_accepted(tmp_path):
    f = _write(tmp_path / "c.txt", "a\tb\r\nc\f" + "word " * 100 + "\x1b")
    assert read_documents(f) == [f.read_bytes().decode()]


def test_non_utf8_text_names_the_line(tmp_path):
    f = _write(tmp_path / "c.txt", b"one\ntwo\nthr\xffee\n")
    with pytest.raises(CorpusError, match=f"{f}:3 is not UTF-8"):
        read_documents(f)


def test_fifo_device_and_folder_are_refused_by_name_before_reading(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)  # reading it would block forever
    for path, says in ((fifo, "is a FIFO"), (Path("/dev/zero"), "is a device"), (tmp_path, "is a folder")):
        for read in (read_documents, lambda p: read_corpus([str(p)]), lambda p: read_prompts([str(p)]),
                     load_examples, check_corpus_path):
            with pytest.raises(CastloraError, match=says) as e:
                read(str(path) if read is check_corpus_path else path)
            assert str(path) in _one_line(e)


def test_files_over_the_size_cap_are_refused_naming_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "MAX_TEXT_BYTES", 100)
    small = _write(tmp_path / "small.txt", "x" * 100)
    assert read_documents(small) == ["x" * 100]
    big = _write(tmp_path / "big.txt", "x" * 101)
    with pytest.raises(CorpusError, match="over castlora's 100 bytes cap") as e:
        read_documents(big)
    assert str(big) in _one_line(e)
    bomb = tmp_path / "bomb.txt.gz"
    bomb.write_bytes(gzip.compress(b"x" * 1000))
    with pytest.raises(CorpusError, match="decompresses to over castlora's 100 bytes cap"):
        read_documents(bomb)


def test_examples_with_a_broken_line_or_bad_bytes_name_file_and_line(tmp_path):
    good = '{"prompt": "a", "completion": "b"}\n'
    for data, says in ((good + "{oops\n", ":2 is not a JSON line"), (good.encode() + b"\xff\n", ":2 is not UTF-8"),
                       (good + "5\n", ":2 needs 'prompt' and 'completion'"),
                       (good + '{"prompt": "a", "completion": null}\n', ":2: field 'completion' is null")):
        f = _write(tmp_path / "ex.jsonl", data)
        with pytest.raises(CastloraError, match=f"{f}{says}") as e:
            load_examples(f)
        _one_line(e)
    assert load_examples(_write(tmp_path / "ok.jsonl", good)) == [{"prompt": "a", "completion": "b"}]
    assert not is_examples_file(_write(tmp_path / "n.jsonl", "42\n"))
    assert not is_examples_file(_write(tmp_path / "b.jsonl", "{oops\n"))


# ------------------------------------------------------------------ model folders


def test_a_model_config_json_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    _write(tmp_path / "m" / "config.json", "[]")
    with pytest.raises(CastloraError, match="config.json holds a JSON list, not an object") as e:
        check_model_path(str(tmp_path / "m"))
    assert "download the model again" in _one_line(e)
    _write(tmp_path / "m" / "config.json", "{nope")
    with pytest.raises(CastloraError, match="cannot be read as JSON"):
        check_model_path(str(tmp_path / "m"))


def test_a_tokenizer_of_another_model_is_refused(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    _write(m / "config.json", json.dumps({"model_type": "llama", "vocab_size": 128}))
    save_file({"w": torch.zeros(1)}, str(m / "model.safetensors"))
    _write(m / "tokenizer.json", json.dumps({"model": {"vocab": {"a": 0, "b": 127}}, "added_tokens": []}))
    check_model_path(str(m))
    _write(m / "tokenizer.json", json.dumps({"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": 50256}]}))
    with pytest.raises(CastloraError, match="token ids up to 50256 but the model has vocab_size 128") as e:
        check_model_path(str(m))
    assert "another model" in _one_line(e)


# ------------------------------------------------------------------ generated inputs

_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                     max_leaves=6)
_modules = ["q_proj", "v_proj", "k_proj"]
_values = st.sampled_from([0.0, 1.0, -0.5, 1e-3, 3e4, 1e20, 3e38, float("nan"), float("inf"), -float("inf")])
_bad_sometimes = st.integers(0, 9).map(lambda n: n == 0)  # true one time in ten


@st.composite
def _adapter_case(draw):
    """(config, tensors): a plausible LoRA with some fields, shapes or values broken, or any JSON at all."""
    if draw(_bad_sometimes):
        return draw(_json), {}

    def pick(good, bad=_json):  # a good value nine times in ten
        return draw(bad) if draw(_bad_sometimes) else draw(good)

    r = draw(st.integers(1, 4))
    config = {"r": pick(st.just(r), st.integers(-2, 6) | _json),
              "lora_alpha": pick(st.integers(1, 16) | st.floats(-1e40, 1e40), st.floats() | _json),
              "target_modules": pick(st.lists(st.sampled_from(_modules), min_size=1, max_size=3),
                                     st.sampled_from([r".*\.q_proj", "(", "all-linear", "", ".*"]) | _json)}
    optional = {
        "peft_type": (st.sampled_from(["LORA", "lora"]), st.just("IA3") | _json),
        "use_dora": (st.just(False),), "modules_to_save": (st.none(),),
        "rank_pattern": (st.dictionaries(st.sampled_from(_modules + ["["]), st.integers(-1, 5), max_size=2),),
        "alpha_pattern": (st.dictionaries(st.sampled_from(_modules), st.floats(), max_size=2),),
        "layers_to_transform": (st.none() | st.integers(-1, 2) | st.lists(st.integers(0, 2), max_size=2),),
        "layers_pattern": (st.none() | st.sampled_from(["layers", "(", "h"]),),
        "use_rslora": (st.booleans(),), "exclude_modules": (st.none() | st.just(["v_proj"]),),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        config[key] = pick(*optional[key])
    tensors = {}
    for layer in draw(st.lists(st.sampled_from(["0", "1"]), min_size=1, max_size=2, unique=True)):
        targets = config["target_modules"]
        pool = [t for t in targets if t in _modules] if isinstance(targets, list) else []
        for name in draw(st.lists(st.sampled_from(_modules if draw(_bad_sometimes) or not pool else pool),
                                  min_size=1, max_size=2, unique=True)):
            rank = draw(st.integers(0, 5)) if draw(_bad_sometimes) else r
            d = draw(st.integers(1, 4))
            for ab, shape in (("A", (rank, d)), ("B", (d, rank + draw(_bad_sometimes)))):
                if draw(_bad_sometimes) and draw(_bad_sometimes):
                    continue  # half of a pair missing
                n = shape[0] * shape[1]
                values = draw(st.lists(st.floats(-2, 2) if not draw(_bad_sometimes) else _values,
                                       min_size=n, max_size=n))
                tensors[f"{PREFIX}.{layer}.self_attn.{name}.lora_{ab}.weight"] = torch.tensor(
                    values, dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))).reshape(shape)
    if draw(_bad_sometimes):
        tensors[f"{PREFIX}.0.self_attn.q_proj.other.weight"] = torch.zeros(2)
    return config, tensors


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_adapter_case())
def test_generated_adapters_are_accepted_or_refused_with_a_castlora_error_and_left_unchanged(case):
    config, tensors = case
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        before = _digests(folder)
        for call in (lambda: check_adapter(config, tensors), lambda: read_adapter_folder(folder, warn=lambda m: None)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # no stray warnings from torch or re either
                    call()
            except CastloraError as e:
                assert "\n" not in str(e)
        assert _digests(folder) == before


_lines = st.one_of(
    _json.map(json.dumps),
    st.fixed_dictionaries({}, optional={"text": _json | st.text(), "prompt": _json | st.text(),
                                        "completion": _json | st.text()}).map(json.dumps),
    st.text(max_size=20),
    st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_lines, max_size=5), raw=st.binary(max_size=30), suffix=st.sampled_from([".jsonl", ".txt"]),
       prompts=st.booleans())
def test_generated_corpus_lines_are_read_or_refused_with_a_castlora_error_and_left_unchanged(lines, raw, suffix,
                                                                                              prompts):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / f"c{suffix}"
        f.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + raw)
        before = _digests(Path(d))
        try:
            docs = read_documents(f, prompts_only=prompts)
            assert all(isinstance(doc, str) and doc.strip() for doc in docs)
        except CastloraError as e:
            assert "\n" not in str(e)
        assert _digests(Path(d)) == before


def test_devices_are_named_before_any_model_loads():
    from castlora.config import TranslateConfig, resolve_device

    with pytest.raises(CastloraError, match="--device must be auto, cpu, cuda, cuda:N"):
        TranslateConfig(device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(CastloraError, match="--device cuda: this machine has no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") in ("cpu", "cuda")


def test_a_delta_no_forward_pass_survives_is_refused_before_any_model_loads():
    from castlora.adapters import BROKEN_DELTA_NORM, check_adapter

    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}
    A, B = torch.ones(2, 8) * 0.1, torch.ones(8, 2) * 1e12
    with pytest.raises(CastloraError, match=re.escape(f"above {BROKEN_DELTA_NORM:g}") + ".*the adapter is broken"):
        check_adapter(config, {"base_model.model.layers.0.q_proj.lora_A.weight": A,
                               "base_model.model.layers.0.q_proj.lora_B.weight": B})

"""What `--teacher auto` sees: both base models' bits per byte on the calibration texts of a bench
run (150 steps of 8, 400 generated texts, seed 0, 4 calibration batches: general chunks 800-831 of
the source's chunking), and the teacher it picks.

  OMP_NUM_THREADS=1 python benchmarks/teacher_strength.py mistral:llama:runs/lev_ml neox:llama:runs/lev_nl

Each argument is SRC:TGT:DIR with the source's shakespeare LoRA in DIR/loras/{SRC}_shakespeare.
"""

import sys

from peft import PeftModel

from castlora.corpus import make_chunks, read_corpus
from castlora.demo import shared_dir
from castlora.models import load_model, load_tokenizer
from castlora.teacher_choice import choose_teacher

zoo = shared_dir(None) / "zoo"
docs = read_corpus([str(shared_dir(None) / "data" / "general" / "train.txt.gz")])
for spec in sys.argv[1:]:
    src, tgt, folder = spec.split(":")
    tok_s, tok_t = load_tokenizer(str(zoo / src)), load_tokenizer(str(zoo / tgt))
    calib = make_chunks(docs, tok_s, 128, 832, seed=0)[800:832]  # as translate._training_texts takes them
    source = PeftModel.from_pretrained(load_model(str(zoo / src)), f"{folder}/loras/{src}_shakespeare").eval()
    print(src, "->", tgt, choose_teacher(source, tok_s, load_model(str(zoo / tgt)), tok_t, calib, 192), flush=True)

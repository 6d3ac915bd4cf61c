"""The command line of the diagnostics that read a levers.py folder: TASK SRC TGT DIR [PORT...].
DIR holds DIR/loras/{model}_{task} and DIR/ports/NAME; the zoo and data come from CASTLORA_SHARED."""

import sys
from pathlib import Path
from types import SimpleNamespace

from castlora.demo import shared_dir
from castlora.models import load_tokenizer
from castlora.tokens import shared_vocab


def lever_folder(argv=None) -> SimpleNamespace:
    task, src, tgt, out = (argv or sys.argv)[1:5]
    shared = shared_dir(None)
    zoo = shared / "zoo"
    tok_s, tok_t = load_tokenizer(str(zoo / src)), load_tokenizer(str(zoo / tgt))
    return SimpleNamespace(task=task, src=src, tgt=tgt, out=Path(out), ports=(argv or sys.argv)[5:], shared=shared,
                           zoo=zoo, tok_s=tok_s, tok_t=tok_t, vocab=shared_vocab(tok_s, tok_t))

"""Copy probe: does a saved model copy a random string from `period` tokens back?

    python bench/induction/copy_probe.py PERIOD WORKDIR [WORKDIR ...]

Feeds BOS + a random string of `period` characters written twice and reads the argmax over
the second copy: the fraction right (chance ~1/62 for letters and digits, 1/10 for digits).
With a period longer than RNoPE-SWA's window only the full-attention NoPE layer can reach
the first copy, so the probe tells whether that layer learned to copy (a needle's answer
needs it) or only the windowed layers did. Prints one JSON line per workdir.
"""

import json
import string
import sys
from pathlib import Path

import numpy as np

from hybridlm.data.tokenizers import ByteTokenizer
from hybridlm.runs import load_model

ALPHABETS = {"letters_digits": string.ascii_letters + string.digits, "digits": string.digits}
STRINGS = 8


def probe(workdir: Path, period: int) -> dict:
    cfg, model, step = load_model(workdir)
    tok, rng = ByteTokenizer(), np.random.default_rng(0)
    out = {"workdir": str(workdir), "step": step, "period": period}
    for name, alphabet in ALPHABETS.items():
        right = []
        for _ in range(STRINGS):
            text = "".join(rng.choice(list(alphabet), period)) * 2
            ids = np.concatenate([[tok.bos_id], tok.encode(text)]).astype(np.int32)
            pred = np.asarray(model(ids[None, :-1]))[0].argmax(-1)
            right.append(float((pred[period + 1:] == ids[period + 2:]).mean()))
        out[name] = float(np.mean(right))
    return out


if __name__ == "__main__":
    for wd in sys.argv[2:]:
        print(json.dumps(probe(Path(wd), int(sys.argv[1]))), flush=True)

"""Teacher-forced needle probe: does a saved model copy a needle's digits at all?

    python bench/induction/needle_probe.py WORKDIR LENGTH [SAMPLES] [STEP]

For SAMPLES single needles at LENGTH tokens (held-out and training-range values), feed the
prompt plus the true answer and read the argmax at each answer digit: `digit_acc` (chance
0.10), `first` (the first digit), `all_tf` (every digit right) and `digit_loss` (nats; ln 10 =
2.30 is no information). Finer than the exact-match score, which is 0 until all 7 are right.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybridlm.data.prepare import resolve_tokenizer
from hybridlm.eval import heldout, tasks
from hybridlm.runs import load_model

DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]


def probe(workdir: Path, length: int, samples: int, step: int | None) -> dict:
    cfg, model, step = load_model(workdir, step)
    tokenizer = resolve_tokenizer(cfg.data, progress=False)
    cfg.data.source, cfg.data.weights = "stdlib", ""  # haystacks from natural text
    hay = heldout.haystack(cfg, tokenizer, min_tokens=length * 2)
    graph, state = nnx.split(model)
    logits_of = jax.jit(lambda st, x: nnx.merge(graph, st)(x))
    row = {"step": step, "length": length}
    for split in ("heldout", "train"):
        cells = tasks.make_samples("niah_single", tokenizer, hay, [length], DEPTHS,
                                   samples // len(DEPTHS), 0, split)
        losses, first, whole, per_digit = [], [], [], []
        for s in cells:
            answer = tokenizer.encode(s.answer)
            ids = np.concatenate([s.ids, answer])
            x = jnp.asarray(np.pad(ids, (0, length + 16 - len(ids))))[None]
            logits = np.asarray(logits_of(state, x))[0]
            digits = [i for i in range(len(answer))
                      if tokenizer.decode([int(answer[i])]).strip().isdigit()]
            at = [len(s.ids) - 1 + i for i in digits]  # the position that predicts answer[i]
            logp = np.asarray(jax.nn.log_softmax(logits[at], -1))
            losses.append(-float(np.mean([logp[j, answer[i]] for j, i in enumerate(digits)])))
            hit = logits[at].argmax(-1) == answer[digits]
            first.append(bool(hit[0]))
            whole.append(bool(hit.all()))
            per_digit.append(float(hit.mean()))
        row[split] = {"digit_loss": float(np.mean(losses)), "digit_acc": float(np.mean(per_digit)),
                      "first": float(np.mean(first)), "all_tf": float(np.mean(whole))}
    return row


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(probe(Path(args[0]), int(args[1]), int(args[2]) if len(args) > 2 else 40,
                           int(args[3]) if len(args) > 3 else None)))

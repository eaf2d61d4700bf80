"""Run the reference (seed_reference.py, the notebook as a script) on a device.

    python bench/gpu_reference.py --reference PATH --device cuda -- train --data DIR --steps 45

The reference has no device option: it builds everything on the CPU. This runs its source
unchanged but for PATCHES: `.to(DEVICE)` where its tensors are made (the model, the training and
evaluation batches, the generation prefix), and in the training loop one call that notes each
step's (steps, real tokens, seconds) on its own clock, so that one run gives its steady state (a
second run for the warm-up alone would cost a process, a tokenizer fit and a CUDA start). Every
patch must match its expected number of times, or this stops before running anything (the
reference changed, and these patches would no longer be the whole story). Everything else -- the
tokenizer, the DataLoader, the loss, the optimizer, its timers and its JSON line -- is the
reference's own; its timers stay honest on CUDA, since every training step ends in `.item()`,
every evaluation batch too, and every generated word in `.cpu()`, each of which waits for the GPU.
After the reference's JSON line this prints one of its own: {"step_clock": [[steps, real, s], ...]}.
On the CPU the patches move nothing (the dry run uses them, so this path is exercised).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

LOOP_CLOCK = "                el = time.perf_counter() - t0\n"  # the training loop's, 16 spaces in
# (what the reference says, what it becomes, how many times it must occur)
PATCHES = [
    ("model = LM(300, len(tok.w2i), 256, pad)", "model = LM(300, len(tok.w2i), 256, pad).to(DEVICE)", 1),
    ("idxs = idxs.long()", "idxs = idxs.long().to(DEVICE)", 2),  # masked_eval and the training loop
    ("idxs = torch.from_numpy(np.array(list_idxs)).long().unsqueeze(0)",
     "idxs = torch.from_numpy(np.array(list_idxs)).long().unsqueeze(0).to(DEVICE)", 1),
    (LOOP_CLOCK, LOOP_CLOCK + "                STEP_CLOCK.append([steps, real, el])\n", 1),
]


def patched_source(path: Path) -> str:
    """The reference's source with its tensors placed on DEVICE; SystemExit if it changed."""
    text = path.read_text(encoding="utf-8")
    for old, new, count in PATCHES:
        found = text.count(old)
        if found != count:
            raise SystemExit(f"gpu_reference: {path} has {found} occurrence(s) of {old.strip()!r}, expected "
                             f"{count}: the reference changed, so it cannot be placed on a device this way")
        text = text.replace(old, new)
    return text


def describe(path: Path) -> dict:
    """What is run: the reference's file, its digest, and the patches (for the result JSON)."""
    patched_source(path)
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "patches": [{"from": old.strip(), "to": new.strip(), "count": n} for old, new, n in PATCHES]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the reference's own arguments")
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    source = patched_source(a.reference)
    import torch  # after the checks: a changed reference fails in a fraction of a second

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_reference: --device cuda, but torch sees no CUDA device")
    sys.argv = [str(a.reference), *args]
    clock: list[list[float]] = []
    code = compile(source, str(a.reference), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(a.reference), "DEVICE": device, "STEP_CLOCK": clock})
    print(json.dumps({"step_clock": clock}))


if __name__ == "__main__":
    main()

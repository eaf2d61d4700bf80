"""The reference's training runs (`seed_reference.py train --steps N`), shared by the train and
ttq sections: whichever runs first measures them, the other reuses them (b.ref_train,
b.ref_warm)."""

from __future__ import annotations

from children import proc_fields
from context import Bench


def ref_train_run(b: Bench, tag: str, steps: int) -> dict:
    c = b.child(f"ref-train-{tag}", b.reference("train", "--steps", str(steps)))
    j = c["json"]
    run = {"steps": j["steps"], "train_s": j["train_s"],
           "real_tokens": round(j["real_tokens_per_s"] * j["train_s"]),
           "s_per_step_with_warmup": round(j["train_s"] / j["steps"], 3),
           "real_tokens_per_s_with_warmup": j["real_tokens_per_s"],
           "positions_per_s": j["positions_per_s"],
           "tokenizer_fit_s": j["fit_s"], "last_loss": j["last_loss"], **proc_fields(c)}
    print(f"    reference: {run['steps']} steps in {run['train_s']} s "
          f"({run['real_tokens_per_s_with_warmup']} real tokens/s), peak RSS {run['peak_rss_mb']} MB "
          f"(other CPU load {run['other_cpu_cores']} cores)", flush=True)
    return run


def reference_training(b: Bench, runs: int) -> None:
    """The reference's steady state: runs of N steps minus a run of the first W steps (the same
    batches: its loader's shuffle is seeded), so its warm-up is excluded as ours is."""
    a = b.args
    if b.ref_warm is None:
        b.ref_warm = ref_train_run(b, "warmup", a.warmup_steps)
    while len(b.ref_train) < runs:
        run = ref_train_run(b, str(len(b.ref_train) + 1), a.ref_steps)
        w = b.ref_warm
        dt = run["train_s"] - w["train_s"]
        run["steady_state"] = dt > 0  # noise can beat the difference on tiny data
        if run["steady_state"]:
            run["s_per_step"] = round(dt / (run["steps"] - w["steps"]), 3)
            run["real_tokens_per_s"] = round((run["real_tokens"] - w["real_tokens"]) / dt, 1)
        else:
            run["s_per_step"] = run["s_per_step_with_warmup"]
            run["real_tokens_per_s"] = run["real_tokens_per_s_with_warmup"]
        print(f"      steps {w['steps'] + 1}-{run['steps']}: {run['s_per_step']} s/step, "
              f"{run['real_tokens_per_s']} real tokens/s"
              + ("" if run["steady_state"] else " (whole run: shorter than the warm-up run's noise)"),
              flush=True)
        b.ref_train.append(run)

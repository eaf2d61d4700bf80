"""Tracking: every figure to metrics.jsonl, W&B when it can, reports and progress without it.

    metrics     MetricsLog: metrics.jsonl, one row per log step, written before anything else
    tracker     Tracker: a W&B run that never stops a job (a failure turns it into a no-op)
    wandb_init  open_tracker: the mode (online, offline, off), the run id across requeues
    report      write_report: PNG curves and a summary from metrics.jsonl (`lmcore report`)
    compare     write_compare: several runs' validation curves and a table (`lmcore report --compare`)
    progress    Progress: a bar on a terminal, plain lines in log files
"""

__all__ = ["metrics", "tracker", "wandb_init", "report", "compare", "progress"]

"""The process a job runs in: devices and ranks, stop signals, the lock on its folder.

    accelerator  make_accelerator (CPU, GPU, DDP as the launcher set up), all_sum, any_rank
    signals      StopFlag: TERM/USR2 become "checkpoint, then exit with STOPPED_EXIT (3)"
    lock         RunLock: one job per run folder (or generation shard), refused clearly
"""

__all__ = ["accelerator", "signals", "lock"]

"""The process a job runs in: devices and ranks, stop signals, the lock on its folder, the
precision of its hot matmuls.

    accelerator  make_accelerator (CPU, GPU, DDP as the launcher set up), all_sum, any_rank,
                 broadcast_object
    signals      StopFlag: TERM/USR2 become "checkpoint, then exit with STOPPED_EXIT (3)"
    lock         RunLock: one job per run folder (or generation shard), refused clearly
    leave        how a rank of a multi-rank job ends: at once, without the interpreter's teardown
    precision    train.loss_precision: the fused loss's matmuls, measured per machine (auto)
"""

__all__ = ["accelerator", "signals", "lock", "precision"]

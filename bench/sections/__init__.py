"""The sections of bench.py (--only), one module each: peak, train, ttq, eval, gen.

Each has run(b), which takes the shared context (context.Bench), runs both sides as child
processes, stores its figures in b.result["sections"][NAME], prints its table and adds its
targets (b.target). ref_train holds the reference's training runs, which train and ttq share.
"""

"""convit_ssl's changes to VISSL 0.1.6, ClassyVision 0.7.0 and what they call,
so that they run on today's stack (Python 3.11+, torch 2, numpy 2, Pillow 10+)
and on CPUs: the patch table (`patches.PATCHES`, listed in docs/STACK.md), the
upstream methods it replaces whole (`upstream`, each naming the lines it
copies and what differs) and the ranks' random-number states that checkpoints
carry (`rng`).

This is the one place that changes VISSL. `convit_ssl.vissl` applies the table
when imported, before anything imports VISSL; nothing else calls `apply()`.
Its modules import nothing of VISSL at their top (the patches import what they
patch when applied); from the rest of convit_ssl.vissl they take only the
trunk's names (`model.trunk`) and the rank set-up (`run.ranks`), neither of
which imports VISSL.
"""

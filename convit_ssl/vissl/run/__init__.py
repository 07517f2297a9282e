"""A VISSL run's life: the checks before launch (`validate`, and
`output_folder`: writable, not another run's), launching locally or on SLURM
(`launcher`), or as a rank torchrun started (`torchrun`: VISSL's keys from
torch's environment), what each rank and data-loader worker sets up first
(`ranks`, with the one rule `spawns_ranks(config)`), the hooks of a run
(`hooks`) and stopping with a checkpoint, then resuming (`stop`;
`convit_ssl.processes` passes the signals on).

Imports every other part of convit_ssl.vissl but `benchmarks`; imported by
the commands and `benchmarks`. `ranks` and `torchrun` import nothing of
VISSL, so the patch table can name their functions before VISSL is loaded.
"""

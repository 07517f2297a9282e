"""Experiments made of several VISSL runs: the demo, the self-supervised
sweep and the data-efficiency sweep, and what they share.

- `stages`: runs `convit-ssl run` jobs as child processes, two at a time as
  soon as the runs they start from have finished, progress echoed.
- `overrides`: the Hydra overrides of a run's data, kNN monitor and
  architecture twin (ConViT or the DeiT of identical dimensions).
- `data_efficiency`: supervised ConViT against its DeiT twin on class-balanced
  fractions of the training set (the paper's Table 2 at small scale).

Each run is its own process (VISSL initialises a process group per run), so
nothing here imports VISSL: the layers below (`convit_ssl.checkpoints`,
`convit_ssl.data`, the VISSL adapter's config helpers) are read, and only the
commands (`convit_ssl.cli`) and `tools/` import this package.
"""

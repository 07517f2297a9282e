"""Experiments made of several VISSL runs, and what they share.

- `stages`: runs `convit-ssl run` jobs as child processes, two at a time as
  soon as the runs they start from have finished, progress echoed.
- `overrides`: the Hydra overrides of a run's data, kNN monitor and
  architecture twin (ConViT or the DeiT of identical dimensions).
- `seeds`: what a measurement repeated over seeds is summarised by.
- `data_efficiency`: supervised ConViT against its DeiT twin on class-balanced
  fractions of the training set (the paper's Table 2 at small scale).
- `ssl_quality`: each self-supervised method against the same trunk at
  random init (kNN and linear probes).
- `demo`: `make demo`.
- `vissl_selftest`: VISSL's own test suite, file by file, under convit_ssl's
  patches (tools/vissl_selftest.py).

Each run is its own process (VISSL initialises a process group per run); this
package composes configs and reads run folders (`convit_ssl.vissl.configs`,
`convit_ssl.checkpoints.run_folder`) but trains nothing in its own process.
Only the commands (`convit_ssl.cli`) and `tools/` import it.
"""

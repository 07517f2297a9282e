"""convit_ssl's monitors of a VISSL run, each switched on by its config block:
the online kNN (`knn`), the gates' and nonlocality's analysis (`analysis`),
the count of unreadable images (`unreadable`), with what they share
(`common`: config blocks, RNG isolation, record files; `images`: the held-out
images they measure on).

Imports `model`, `configs` and convit_ssl.analysis / evaluation; imported by
`run.hooks`, which puts them in a run (with the stop hook), and by readers of
their record files.
"""

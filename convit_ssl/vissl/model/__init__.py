"""The model side of VISSL: the `convit_ssl` trunk (`trunk`: a
`convit_ssl.models.ConViT` built from ``MODEL.TRUNK.CONVIT_SSL`` with VISSL's
named features), the weights-init loader that resamples a checkpoint to the
run's grid (`weights_init`), and VISSL's own built-in `convit` trunk built to
hold a checkpoint (`builtin_convit`), the reference that conversions are
checked against.

Imports convit_ssl.models and checkpoints, `convit_ssl.vissl.configs` and
VISSL; imported by the rest of convit_ssl.vissl and by the commands.
"""

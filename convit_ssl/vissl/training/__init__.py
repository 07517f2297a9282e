"""How a VISSL run trains a ConViT beyond VISSL's defaults: the
`convit_ssl_task` task (`task`: repeated augmentation, data-efficiency
subsets, a sampler that resumes mid-epoch), layer-wise learning-rate decay (`llrd`) and the photometric
augmentation on the training device (`device_augment`).

Imports `model` and convit_ssl.data; imported by `run` (checks, launch) and
by the package's registration.
"""

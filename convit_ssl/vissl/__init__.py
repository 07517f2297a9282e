"""Everything that knows VISSL, by concern (each subpackage's docstring says
what lives there and what may import it):

- `compat`: the patch table that makes VISSL 0.1.6 and ClassyVision run on
  today's stack, and the upstream methods it replaces whole;
- `configs`: finding and composing convit_ssl's VISSL configs;
- `model`: the `convit_ssl` trunk, the weights-init loader, VISSL's own
  built-in `convit` trunk as a reference;
- `training`: the `convit_ssl_task` task, layer-wise lr decay, augmentation on
  the training device;
- `hooks`: convit_ssl's monitors (kNN, analysis, unreadable images);
- `run`: a run's life: checks before launch, launching (local, SLURM), rank
  set-up, the hooks of a run, stop and preemption;
- `benchmarks`: the extraction-based benchmarks (kNN, SVM, low-shot).

Imports go one way: compat <- configs <- model <- training <- hooks <- run <-
benchmarks (compat takes only names from `model.trunk` and the rank set-up of
`run.ranks`, which import nothing of VISSL).

Importing this package sets VISSL up for convit_ssl: it applies the patches
(before anything imports VISSL) and registers the `convit_ssl` trunk and
tasks. Every VISSL entry point imports it (directly or through a module of
it), and so does every rank VISSL spawns and every SLURM job on its node,
since what they run is pickled by reference to a module in here.
`convit_ssl` itself, `convit_ssl.models`, `checkpoints` and `analysis` never
import it.
"""

from convit_ssl.vissl.compat import patches

patches.apply()

from convit_ssl.vissl.model.trunk import TRUNK_NAME, ConViTSSLTrunk, trunk_kwargs  # noqa: E402


def register() -> None:
    """Register everything convit_ssl adds to VISSL: the trunk and the tasks (idempotent)."""
    # patch order: after patches.apply() above (the task module imports VISSL)
    from convit_ssl.vissl.model import trunk
    from convit_ssl.vissl.training import task

    trunk.register()
    task.register()


register()

__all__ = ["TRUNK_NAME", "ConViTSSLTrunk", "register", "trunk_kwargs"]

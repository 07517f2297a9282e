"""Everything that knows VISSL: the trunk adapter, tasks, hooks, config
composition, checks and the launcher.

Importing this package sets VISSL up for convit_ssl: it applies `patches`
(before anything imports VISSL) and registers the `convit_ssl` trunk, tasks and
fixes. Every VISSL entry point imports it (directly or through a module of
it), and so does every rank VISSL spawns and every SLURM job on its node,
since what they run is pickled by reference to a module in here.
`convit_ssl` itself, `convit_ssl.models`, `checkpoints` and `analysis` never
import it.
"""

from convit_ssl.vissl import patches

patches.apply()

from convit_ssl.vissl.trunk import TRUNK_NAME, ConViTSSLTrunk, trunk_kwargs  # noqa: E402


def register() -> None:
    """Register everything convit_ssl adds to VISSL: the trunk and the tasks (idempotent)."""
    # patch order: after patches.apply() above (the task module imports VISSL)
    from convit_ssl.vissl import task, trunk

    trunk.register()
    task.register()


register()

__all__ = ["TRUNK_NAME", "ConViTSSLTrunk", "register", "trunk_kwargs"]

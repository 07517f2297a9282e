"""Everything that knows VISSL: the trunk adapter, config composition, checks, launcher."""

from convit_ssl.vissl.trunk import TRUNK_NAME, ConViTSSLTrunk, trunk_kwargs


def register() -> None:
    """Register everything convit_ssl adds to VISSL: the trunk, the tasks, and the
    fixes VISSL's DINO and DeepCluster-v2 need for them (idempotent)."""
    from convit_ssl.vissl import llrd, ssl_compat, task, trunk

    trunk.register()
    task.register()
    llrd.register()
    ssl_compat.apply()


__all__ = ["TRUNK_NAME", "ConViTSSLTrunk", "register", "trunk_kwargs"]

"""Everything that knows VISSL: the trunk adapter, config composition, checks, launcher."""

from convit_ssl.vissl.trunk import TRUNK_NAME, ConViTSSLTrunk, trunk_kwargs


def register() -> None:
    """Register everything convit_ssl adds to VISSL: the trunk and the tasks (idempotent)."""
    from convit_ssl.vissl import llrd, task, trunk

    trunk.register()
    task.register()
    llrd.register()


__all__ = ["TRUNK_NAME", "ConViTSSLTrunk", "register", "trunk_kwargs"]

"""Everything that knows VISSL: the trunk adapter, config composition, checks, launcher."""

from convit_ssl.vissl.trunk import TRUNK_NAME, ConViTSSLTrunk, register, trunk_kwargs

__all__ = ["TRUNK_NAME", "ConViTSSLTrunk", "register", "trunk_kwargs"]

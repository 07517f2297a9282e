"""Embedded offline data."""

from convit_ssl.data.digits import export_digits

__all__ = ["export_digits"]

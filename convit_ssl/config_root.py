"""Where convit_ssl's YAML tree lives: `configs/` of a source checkout, or
`site-packages/convit_ssl/configs` of an install. Knows no VISSL: the
converter's configs (`convert/`) are found here too."""

from __future__ import annotations

from pathlib import Path

# A file that exists only in convit_ssl's config tree, to tell it apart from
# VISSL's top-level `configs` package that sits beside ours in site-packages.
MARKER = Path("config") / "convit_ssl" / "README.md"


def config_root() -> Path:
    """The directory that holds convit_ssl's `config/` (VISSL) and `convert/` trees."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / MARKER).is_file():
            return candidate
    raise FileNotFoundError(
        f"convit_ssl's configs were not found in {package / 'configs'} (installed) "
        f"or {package.parent / 'configs'} (source checkout); reinstall the package"
    )

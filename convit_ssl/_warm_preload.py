"""What the fork server of `convit_ssl.warm` imports once: the CLI with VISSL
set up (patches, registration), VISSL's engines and launcher, without the
import-time warnings of its dependencies (a `convit-ssl` command hides them too)."""

import warnings

# runpy's warning when a fork runs a module the server has loaded (`-m convit_ssl.cli`,
# or the parent's main module as multiprocessing re-imports it): loaded on purpose here
warnings.filterwarnings("ignore", message=".* found in sys.modules after import of package", category=RuntimeWarning)

from convit_ssl.cli import quiet_library_warnings, setup_vissl

setup_vissl()
with warnings.catch_warnings():
    quiet_library_warnings()
    import vissl.engines.extract_features  # noqa: F401
    import vissl.engines.train  # noqa: F401
    import vissl.utils.distributed_launcher  # noqa: F401

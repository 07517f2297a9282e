"""`python -m convit_ssl.cli ...`: the `convit-ssl` command."""

import sys

from convit_ssl.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""`python3 -m simulate ...`: the same as `byteback simulate ...` (run from the repository root)."""
import sys

from simulate import cli

sys.exit(cli.main(sys.argv[1:]))

"""`python -m prunekit` (also what torchrun runs)."""

from prunekit.cli import main

main()

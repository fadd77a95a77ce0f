"""`python -m gpubake` is the `gpubake` command."""

from gpubake.cli import main

main()

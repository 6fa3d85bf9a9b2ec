"""`python -m ztunnel_fast` is the `ztunnel-fast` command."""

from .cli import main

main()

"""`python -m ztunnel_fast` is the `ztunnel-fast` command."""

from .entry import main

main()

"""`python -m connector ...`: the same CLI as the `connector` script."""

from connector.cli import main

main()

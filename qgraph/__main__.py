"""``python -m qgraph`` runs the command line."""

from qgraph.cli import main

main()

"""``python -m qgraph`` runs the command line."""

from qgraph.entry import main

main()

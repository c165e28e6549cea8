"""`si`, the command-line client: ``python -m spacehub.cli.main`` or the ``si`` console script."""

"""What tests and benchmarks share: real daemons started as a user would, packages, namespaces.

Neither ``tests/`` nor ``bench/`` imports the other; both import this.
"""

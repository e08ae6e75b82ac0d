"""The check catalogue, one module per category; each module holds its checks in ``CHECKS`` and
:mod:`imagekit.checks.runner` lists the modules."""

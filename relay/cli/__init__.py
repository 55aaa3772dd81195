"""The ``solo-relay`` command: argument parsing (``relay.cli.main``) and the
commands beside ``serve``: ``queue``, ``preview`` and ``token``.
"""

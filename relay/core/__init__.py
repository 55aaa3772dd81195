"""The pure core: addresses, header parsing, the MIME walk, every spelling of an
address, the split, the team-thread mode, the leak guard, DKIM decisions, DSN
building and delivery policy.

Rule 1: no I/O: no sockets, files, event loop, logging or environment. Bytes
and frozen values (``relay.core.model``) come in; values, or a ``Rejected``
carrying its SMTP reply, go out.
Rule 2: no clock of its own: the time a decision needs (a DSN's date, a
retry's due time) is passed in. The one reading of the clock is dkimpy's
``t=`` tag inside ``relay.core.dkim.Signer.sign``, which dkimpy takes itself.
Rule 3: nothing here imports the shell (``tests/test_layers.py`` fails
if a module does).
"""

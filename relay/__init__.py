"""solo-relay: an SMTP relay that sends one isolated copy per recipient."""

__version__ = "0.1.0"

"""Delivery: the queue's workers, and the notifications they and direct mode send (SPEC 5).

Queue workers (``Deliverer``): copies due now are claimed from the spool
(``delivering``, durably), sent through the upstream pool, and their outcome
recorded durably: ``delivered``; ``deferred`` with backoff for a transient
failure; ``failed``, with a delivery status notification to the sender, for
a permanent one or once the lifetime is over. An upstream that refuses the
relay's credentials pauses all delivery instead of burning retries. Time and
randomness are injected, so the schedule is tested without sleeping.

One concept a module:

    worker    ``Deliverer``: the loop, claiming and handing over, slots, drain
    attempt   one copy's attempt: recipient, login, the upstream's send
    bodies    body sharing: one body object per message, loaded once
    settle    ``Settler``: outcomes written into the spool, pause, reachability
    notify    ``notification``: the RFC 3464 report for a failed copy

Direct mode's reply and its copies' fates are ``relay.direct``.

The upstream is whatever ``Upstream`` the server opened; nothing here imports
a network library.
"""

from relay.delivery.notify import notification
from relay.delivery.settle import REPLY_TEXT_CHARS, Settler
from relay.delivery.worker import Deliverer

__all__ = ["REPLY_TEXT_CHARS", "Deliverer", "Settler", "notification"]

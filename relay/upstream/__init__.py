"""The provider side: the upstream URL and its credentials, the SMTP client pool
(TLS, AUTH, pipelining) and the outbox (an upstream that writes ``.eml`` files).

The only package that imports ``aiosmtplib``.
"""

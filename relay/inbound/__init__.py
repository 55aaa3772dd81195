"""The application side: the SMTP listener, STARTTLS, AUTH and the users file,
and the connection gate (limits, overload mode, client networks).

The only package that imports ``aiosmtpd``.
"""

"""The demo application of config/docker-compose.yml: send a test message with smtplib.

One message to two recipients in To and Cc. Through solo-relay each recipient
gets its own copy whose To: names only them (look in mailpit at
http://127.0.0.1:8025). Standard library only.

Environment:
  SMTP_HOST, SMTP_PORT   the relay (default relay:2525)
  MAIL_FROM, MAIL_TO     the sender and a comma-separated recipient list
  SEND_EVERY             seconds between messages; 0 (the default) sends once
  SEND_COUNT             stop after this many messages; 0: never (with SEND_EVERY)
"""

import os
import smtplib
import socket
import sys
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

HOST = os.environ.get("SMTP_HOST", "relay")
PORT = int(os.environ.get("SMTP_PORT", "2525"))
SENDER = os.environ.get("MAIL_FROM", "app@example.org")
RECIPIENTS = [
    a.strip()
    for a in os.environ.get("MAIL_TO", "alice@example.com,bob@example.net").split(",")
    if a.strip()
]
EVERY = float(os.environ.get("SEND_EVERY", "0"))
COUNT = int(os.environ.get("SEND_COUNT", "0"))
CONNECT_TRIES = 30  # the relay may still be starting: one try a second
# Not yet reachable (smtplib's own errors are OSErrors too, but a refusal is final).
NOT_READY = (
    ConnectionError,
    TimeoutError,
    socket.gaierror,
    smtplib.SMTPConnectError,
    smtplib.SMTPServerDisconnected,
)


def build(number: int) -> EmailMessage:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = RECIPIENTS[0]
    if RECIPIENTS[1:]:
        message["Cc"] = ", ".join(RECIPIENTS[1:])
    message["Subject"] = f"solo-relay test message {number}"
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="app.example.org")
    message.set_content(
        "Hello from the demo application.\n"
        "Each recipient receives a copy whose To: names only them.\n"
    )
    return message


def send(number: int) -> None:
    for attempt in range(1, CONNECT_TRIES + 1):
        try:
            with smtplib.SMTP(HOST, PORT, timeout=30) as smtp:
                refused = smtp.send_message(build(number))
        except NOT_READY as exc:
            if attempt == CONNECT_TRIES:
                raise
            print(f"send_test: {HOST}:{PORT} not ready ({exc}); retrying", file=sys.stderr)
            time.sleep(1)
            continue
        print(f"send_test: message {number} accepted; refused recipients: {refused or 'none'}")
        return


def main() -> int:
    number = 1
    while True:
        send(number)
        if EVERY <= 0 or (COUNT and number >= COUNT):
            return 0
        number += 1
        time.sleep(EVERY)


if __name__ == "__main__":
    sys.exit(main())

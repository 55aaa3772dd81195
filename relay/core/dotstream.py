"""The DATA phase on bytes: find the real end of data, undo dot-stuffing.

Rule 1: the end of data is only CRLF "." CRLF (RFC 5321 4.1.1.4); every other
spelling (``\\n.\\n``, ``\\r.\\r``, ``\\r\\n.\\n``, ...) is message content, so
nothing after a fake end is ever read as a command (SMTP smuggling).
Rule 2: a line that starts with "." loses that one dot (RFC 5321 4.5.2), and
nothing else is changed: a bare CR, bare LF or NUL stays for the isolation
core to refuse.
Rule 3: data is taken in blocks, not lines: lines of any length are fine, and
past the size limit the bytes are dropped as they come (only the last four
are kept, to find the end) so an oversized message costs no memory.

Pure: the inbound shell feeds it what the socket gives.
"""

from __future__ import annotations

import re

END = b"\r\n.\r\n"
_STUFFED_AFTER_LF = re.compile(rb"(?<!\r)\n\.")


class DataCollector:
    """Collects one message's DATA from socket blocks, up to ``limit`` octets."""

    def __init__(self, limit: int, *, normalize: bool = False) -> None:
        self._limit = limit
        self._normalize = normalize
        # The CRLF that ended the DATA command line: it lets the first line be
        # unstuffed and an immediate "." CRLF end the data, like any other line.
        self._buffer = bytearray(b"\r\n")
        self._tail = b""
        self.too_big = False
        self.done = False
        self.received = 0

    def feed(self, block: bytes) -> bytes | None:
        """Take a block; once the end of data is in it, return what follows (maybe b"")."""
        self.received += len(block)
        if self.too_big:
            window = self._tail + block
            end = window.find(END)
            if end >= 0:
                self.done = True
                return window[end + len(END) :]
            self._tail = window[-(len(END) - 1) :]
            return None
        start = max(len(self._buffer) - (len(END) - 1), 0)
        self._buffer += block
        end = self._buffer.find(END, start)
        if end >= 0:
            self.done = True
            rest = bytes(self._buffer[end + len(END) :])
            del self._buffer[end + 2 :]  # keep the CRLF that ends the last line
            if len(self._buffer) - 2 > self._limit:  # the block that ended it may be the big one
                self.too_big = True
                self._buffer = bytearray()
            return rest
        if len(self._buffer) - 2 > self._limit:
            self.too_big = True
            self._tail = bytes(self._buffer[-(len(END) - 1) :])
            self._buffer = bytearray()
        return None

    def content(self) -> bytes:
        """The message, dot-unstuffed; call once, after ``feed`` returned non-None."""
        if self.too_big or not self.done:
            raise ValueError("no complete message")
        data = bytes(self._buffer).replace(b"\r\n.", b"\r\n")[2:]
        if self._normalize:
            # A legacy client that ends lines with a bare LF stuffs dots after it too;
            # the LF becomes CRLF later (headers.check_line_endings), so unstuff here.
            data = _STUFFED_AFTER_LF.sub(b"\n", data)
        self._buffer = bytearray()
        return data

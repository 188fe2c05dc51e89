"""What one HTTP/2 connection may cost us: every limit the transport advertises or enforces.

The defaults suit Envoy's ext_proc client (a handful of long-lived connections, one
stream per HTTP request, messages up to ai-lb's ``max_body_bytes`` of 8 MiB plus framing)
and bound what a hostile peer can make one connection hold:

* inbound bytes buffered: one partial frame (``max_frame_size``) plus what flow control
  lets the peer send, ``connection_window`` (no more than that is ever held for unread
  messages, across all streams of the connection);
* per stream: ``stream_window``, or one message of up to ``max_message_size`` (the
  window is widened for a message larger than it, so big prompts flow at full speed);
* streams: ``max_concurrent_streams`` open at a time (more are refused);
* a header block: ``max_header_block`` compressed bytes across HEADERS + CONTINUATION,
  and ``max_header_list_size`` decoded (RFC 9113 6.5.2 accounting);
* control-frame and reset rates, per connection and per second;
* time: a peer must finish the handshake within ``handshake_timeout`` seconds, and a
  connection without an open stream for ``idle_timeout`` seconds is closed.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_FRAME_SIZE, MAX_FRAME_SIZE = 1 << 14, (1 << 24) - 1  # RFC 9113 6.5.2 bounds
MAX_WINDOW = 2**31 - 1


@dataclass(frozen=True)
class H2Limits:
    #: advertised SETTINGS_MAX_FRAME_SIZE; a larger frame is a FRAME_SIZE_ERROR (GOAWAY).
    max_frame_size: int = 1 << 20
    #: advertised SETTINGS_MAX_HEADER_LIST_SIZE; a larger decoded list closes the connection
    #: (ENHANCE_YOUR_CALM: the HPACK state cannot be trusted after an aborted decode).
    max_header_list_size: int = 64 << 10
    #: compressed bytes of one header block (HEADERS + CONTINUATION); more: ENHANCE_YOUR_CALM.
    max_header_block: int = 64 << 10
    #: advertised SETTINGS_MAX_CONCURRENT_STREAMS; a stream beyond it gets RST_STREAM REFUSED_STREAM.
    max_concurrent_streams: int = 1000
    #: advertised SETTINGS_INITIAL_WINDOW_SIZE: unread bytes a stream may have buffered.
    stream_window: int = 1 << 20
    #: the connection's receive window: unread bytes buffered across all its streams.
    connection_window: int = 32 << 20
    #: the largest gRPC message accepted (a larger length prefix: RESOURCE_EXHAUSTED).
    max_message_size: int = 16 << 20
    #: client RST_STREAMs on streams not answered yet, plus streams we refused or reset, per
    #: second; more: GOAWAY ENHANCE_YOUR_CALM (CVE-2023-44487). Resets after our answer are
    #: free: Envoy ends every ext_proc stream that way.
    max_resets_per_second: int = 1000
    #: PING frames per second; more: GOAWAY ENHANCE_YOUR_CALM.
    max_pings_per_second: int = 100
    #: SETTINGS frames per second; more: GOAWAY ENHANCE_YOUR_CALM.
    max_settings_per_second: int = 100
    #: seconds for the client preface and its first SETTINGS frame.
    handshake_timeout: float = 10.0
    #: seconds a connection may stay without any open stream (PINGs and stray bytes do
    #: not count as activity, so slow or abandoned peers are closed too).
    idle_timeout: float = 300.0

    def __post_init__(self) -> None:
        if not MIN_FRAME_SIZE <= self.max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be in [{MIN_FRAME_SIZE}, {MAX_FRAME_SIZE}]")
        if not 0 < self.stream_window <= MAX_WINDOW or not 65535 <= self.connection_window <= MAX_WINDOW:
            raise ValueError("stream_window must be in (0, 2^31-1], connection_window in [65535, 2^31-1]")
        if self.connection_window < self.max_message_size + 5:
            raise ValueError("connection_window must hold one whole message (max_message_size + 5)")
        for name in ("max_header_list_size", "max_header_block", "max_concurrent_streams", "max_message_size",
                     "max_resets_per_second", "max_pings_per_second", "max_settings_per_second",
                     "handshake_timeout", "idle_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


DEFAULT_LIMITS = H2Limits()

"""What ``H2ServerConnection.receive_data`` reports, as plain tuples (cheap on the hot path):

* ``(REQUEST, sid, path, end_stream)``: a new stream's request headers were decoded.
* ``(DATA, sid, data, end_stream)``: request body bytes (padding removed; may be empty),
  or ``end_stream`` alone when the client's trailers closed its side. The bytes count
  against flow control until the application calls ``acknowledge(sid, n)``.
* ``(RESET, sid, code)``: the stream is gone (the client reset it, or a stream error):
  stop serving it.
* ``(CLOSED, code, message)``: the connection failed (GOAWAY queued); send
  ``data_to_send()`` and close the socket.
"""

REQUEST, DATA, RESET, CLOSED = range(4)

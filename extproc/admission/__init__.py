"""Admission control: a route's gateway queue. While every endpoint is saturated, requests
wait in one line (strict priority between classes, FIFO within a class, tenants taking
turns) and are released to the first endpoint that frees up; a full queue answers 429,
a wait past ``max_wait`` 503. With a Redis store the line is shared by every replica."""

from .gate import Admitted, Gate, Rejected

__all__ = ["Admitted", "Gate", "Rejected"]

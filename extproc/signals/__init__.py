"""Signals every policy reads instead of owning its own: the load view per endpoint
(``load``), the metrics scraper service (``scraper``, parsing in ``metrics``), prompt
prefix keys (``prefix_keys``) and the share of recent picks (``pick_share``)."""

from .load import LoadView
from .metrics import EndpointMetrics, parse_metrics
from .pick_share import PickShare
from .scraper import ScrapeSpec, ScraperService, Subscription

__all__ = ["EndpointMetrics", "LoadView", "PickShare", "ScrapeSpec", "ScraperService", "Subscription",
           "parse_metrics"]

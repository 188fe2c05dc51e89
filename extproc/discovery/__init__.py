"""Endpoint sources that feed the ``EndpointDirectory``: Envoy's admin API."""

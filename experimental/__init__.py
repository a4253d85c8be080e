"""Experimental APIs kept for Ray compatibility (``headrace.experimental.async_api``)."""

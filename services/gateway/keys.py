"""Typed keys for what the gateway application holds."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from services.gateway.link import BusLink
from services.gateway.metrics import Metrics
from services.gateway.projection import Projection
from services.gateway.results import ResultReader
from shared.settings import Settings
from shared.tokens import TokenStore

if TYPE_CHECKING:
    from services.gateway.limits import TenantLimits

SETTINGS = web.AppKey("settings", Settings)
AUTH = web.AppKey("auth", TokenStore)
BUS_LINK = web.AppKey("bus_link", BusLink)
PROJECTION = web.AppKey("projection", Projection)
RESULTS = web.AppKey("results", ResultReader)
METRICS = web.AppKey("metrics", Metrics)
UPLOADS = web.AppKey("uploads", asyncio.Semaphore)
"""Submissions with a body over 1 MiB (inline files) read at once: bounds their memory."""
# Typed without importing it here: limits.py raises http.ApiError, and http.py needs METRICS.
LIMITS: web.AppKey[TenantLimits] = web.AppKey("limits")

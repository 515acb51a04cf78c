"""The site's own pages: the landing page at ``/``."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe


@require_safe
def index(request: HttpRequest) -> HttpResponse:
    """What this is and where to go: the admin, the API schema, the health check."""
    return render(request, "terragon/index.html")

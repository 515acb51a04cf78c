from django.http import HttpRequest, HttpResponse
from django.urls import path

from terragon.urls import urlpatterns as site_urlpatterns


async def empty(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b'{"ok":true}', content_type="application/json")


urlpatterns = [path("bench/empty", empty), *site_urlpatterns]

from django.contrib import admin
from django.urls import include, path

from terragon.apikeys.views import daemon_token

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/proxy/openrouter", include("openrouter_proxy.urls")),
    path("api/billing/", include("billing.urls")),
    path("api/internal/daemon-token", daemon_token, name="daemon-token"),
]

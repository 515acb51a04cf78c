from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from openrouter_proxy.health import healthz
from openrouter_proxy.metrics import metrics_view
from terragon.apikeys.views import daemon_token
from terragon.views import index

# The admin index opens with the billing reports (dashboard, users' spend).
admin.site.index_template = "admin/billing/site_index.html"
admin.site.site_header = "Terragon gateway"
admin.site.site_title = "Terragon gateway admin"

urlpatterns = [
    path("", index, name="index"),
    path("healthz", healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("api/proxy/openrouter", include("openrouter_proxy.urls")),
    path("api/billing/", include("billing.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/internal/daemon-token", daemon_token, name="daemon-token"),
    path("metrics", metrics_view, name="metrics"),
]

"""Mount with ``path("api/proxy/openrouter", include("openrouter_proxy.urls"))``.

No trailing slash in the prefix: the bare prefix is the chat-completions
endpoint, and everything below it is proxied.
"""

from django.urls import re_path

from openrouter_proxy.views import proxy

app_name = "openrouter_proxy"

urlpatterns = [
    re_path(r"^(?:/(?P<upstream_path>.*))?$", proxy, name="proxy"),
]

"""Mount with ``path("api/proxy/openrouter", include("openrouter_proxy.urls"))``.

No trailing slash in the prefix: the bare prefix is the chat-completions
endpoint, and everything below it is proxied.
"""

from django.urls import re_path

from openrouter_proxy.views import proxy

app_name = "openrouter_proxy"

urlpatterns = [
    # [\s\S]: every character, newlines included, so that every path below
    # the prefix reaches the view and its checks (a 400), never a 404 page.
    re_path(r"^(?:/(?P<upstream_path>[\s\S]*))?$", proxy, name="proxy"),
]

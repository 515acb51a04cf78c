from django.apps import AppConfig


class OpenRouterProxyConfig(AppConfig):
    name = "openrouter_proxy"
    verbose_name = "OpenRouter proxy"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from openrouter_proxy import checks  # noqa: F401  (registers the system checks)

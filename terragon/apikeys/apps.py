from django.apps import AppConfig


class ApiKeysConfig(AppConfig):
    name = "terragon.apikeys"
    label = "apikeys"
    verbose_name = "API keys"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from terragon.apikeys import checks  # noqa: F401  (registers the system checks)

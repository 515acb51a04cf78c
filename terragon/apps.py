from django.apps import AppConfig


class TerragonConfig(AppConfig):
    name = "terragon"
    verbose_name = "Terragon site"

"""The site's settings plus one empty async view: Django's own ceiling here."""

from terragon.settings import *  # noqa: F403

ROOT_URLCONF = "benchmarks.urls"

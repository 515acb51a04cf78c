"""Tests that start separate processes or real outside pieces: multi-worker servers, the npm
clients, the built wheel in a fresh virtualenv, a browser, the soak."""

"""Tests of pure code: no database, no server."""

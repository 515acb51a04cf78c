"""Helpers for the reliability tests: raw HTTP, process inspection, fault injection."""

"""Test doubles that behave like the real thing: see ``model`` for the fake Messages API."""

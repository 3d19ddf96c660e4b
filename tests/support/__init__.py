"""Helpers shared by the tests (import as ``support.<module>``; tests/ is on sys.path through conftest.py)."""

"""Profile tests for 5.1, 6.1, 6.11 and 6.14 (see conftest.py)."""

"""Engine tests (see conftest.py)."""

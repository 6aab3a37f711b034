"""Tests of the bench code: they import bench/, which tests/ never does. A package, so that pytest puts the
repository root on sys.path and `from bench import ...` and `tests.support` import however pytest is started."""

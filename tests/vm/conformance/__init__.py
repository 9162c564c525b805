"""The POSIX conformance suite that test guests run (posix_suite.py, standard library only)."""

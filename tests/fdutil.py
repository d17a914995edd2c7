"""Small helpers for tests that count descriptors."""

import os


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False

"""Helpers for the test suite: a private docker engine and offline images.

``docker-engine.sh`` starts or stops a private dockerd; ``images.py`` builds
the python3 base image and the runner image from Debian packages. Both are
also used by tests/run.sh. See each file's header.
"""

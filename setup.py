#!/usr/bin/env python
"""A thin setup.py for the habits of Detectron2 users (``python setup.py develop``, older tools).

Everything is declared once, in ``pyproject.toml``: name, version (``regionssl/__init__.py``),
dependencies, extras and packages. setuptools reads them from there; nothing is repeated here.
``pip install -e .`` is the usual route.
"""
from setuptools import setup

setup()

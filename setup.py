from setuptools import setup

# Metadata lives in setup.cfg.  twisted/plugins is listed there as a package
# (without an __init__.py) so that both pip install and an editable install
# put gotunnel_plugins.py where twistd looks for plugins.
setup()

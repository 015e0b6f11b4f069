"""The shipped YAML configs (``*.yaml`` here), installed as package data of ``latentpipe.configs``."""

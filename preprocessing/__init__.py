"""Pure, single-process building blocks: readers, image and caption processing, encoders."""

from importlib.metadata import version

__version__ = version("latentpipe")

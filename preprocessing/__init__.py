"""Pure, single-process building blocks: readers, image and caption processing, encoders."""

__version__ = "0.1.0"

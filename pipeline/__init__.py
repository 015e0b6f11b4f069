"""Ray jobs that apply ``preprocessing`` at scale, and the ``latentpipe`` command line."""

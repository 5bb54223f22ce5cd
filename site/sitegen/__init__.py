"""The generator of the side-by-side site: `site/build.py` is its command line."""

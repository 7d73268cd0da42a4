"""sralign: align generative image super-resolution models with perceptual preferences.

Parts (see DESIGN.md): ``policies`` (SR models behind one protocol), ``rewards`` (IQA metrics
and group rewards), ``data`` (images, degradation), ``losses`` (pure preference losses),
``train`` (trainers), ``eval`` (Best@M / Mean@M / Worst@M).
"""

__version__ = "0.1.0"

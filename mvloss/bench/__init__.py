"""``python -m mvloss.bench``: speed and memory of every mvloss backend against what users run today."""

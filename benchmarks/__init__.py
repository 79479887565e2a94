"""minisd's benchmarks: speed, memory and loading time, minisd and its references side by side in one run.

They import diffusers and transformers (the references), so they live here, outside the run-time packages minisd/
and weights_convert/, and come with a checkout of the repository, not with an installed minisd. Run them from the
repository's root: `python -m benchmarks --help`.

load.py   loading a weights file: minisd vs diffusers' from_single_file, each in a fresh process
speed.py  the networks and a whole image, minisd vs diffusers/transformers on the same random weights
"""

"""Convert SD v1 weights between the official single-file layout, diffusers folders and minisd names."""

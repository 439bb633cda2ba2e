"""The data-site side: local LoRA training and evaluation on the site's own text."""

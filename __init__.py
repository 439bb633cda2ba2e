"""fedcpt: privacy-preserving federated continual pretraining with LoRA adapters on Flower."""

__version__ = "0.1.0"

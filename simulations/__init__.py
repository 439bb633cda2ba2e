"""Named scenarios (``*.toml`` beside this file) and the Flower Simulation Engine runner."""

"""Server-side aggregation strategies over LoRA adapters (one strategy per file)."""

"""The aggregation side: Flower ServerApp, global evaluation and run outputs."""

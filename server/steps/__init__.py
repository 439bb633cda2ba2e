"""Server steps: what the server does with the round's aggregate, using its own data."""

"""Model, data and evaluation code shared by the server and the clients (imports neither)."""

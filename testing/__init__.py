"""Fault injection for tests and ``benchmarks/faults.py``: kill a site or the server at
chosen points, and a catalogue of bad inputs. Nothing here runs in a federation."""

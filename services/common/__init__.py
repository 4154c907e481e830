"""Library code several services use (workspace paths, model resolution, run files).

Not a service: services import from here, never from each other.
"""

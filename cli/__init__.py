"""The ``vpsde`` command line."""

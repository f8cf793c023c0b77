"""Config: the checks of every value, the config tree as files, the command line, run names."""

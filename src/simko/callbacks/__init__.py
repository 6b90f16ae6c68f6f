"""Lightning callbacks of simko.train (configs/callbacks/*.yaml name them by module path)."""

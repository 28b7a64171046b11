"""Small shared utilities: atomic files, locks and digests, the host address, progress, host facts."""

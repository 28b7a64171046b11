"""Data: the official artifacts (registry, download, resolution), SQuAD, and reading LoadGen's logs."""

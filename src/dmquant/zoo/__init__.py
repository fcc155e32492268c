"""Reference models and datasets that ship with dmquant."""

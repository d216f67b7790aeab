"""The demo: one command from a raw corpus (by default the Python standard library) to a served chat model."""

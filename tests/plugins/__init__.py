"""Examples of extending dnn-tricks from outside its package: each is one small module plus
a YAML overlay, named in the config by class path (this folder is on sys.path in tests, as
tests/conftest.py's folder; in your project, any importable package works)."""

"""qvm-wyng: the dom0 half of qubes-wyng."""
__version__ = "0.1.0"

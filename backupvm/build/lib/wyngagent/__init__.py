"""wyng.Agent: the backup-VM half of qubes-wyng."""
__version__ = "0.1.0"

"""Load tracking and replication plans. Pure planning functions here need no torch."""

"""The field side: field protocols, the mirror's point table and snapshots."""

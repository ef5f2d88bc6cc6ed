"""Volume connectors, one module per driver_volume_type (see base.py), and
the attach/detach flows (attachments.py)."""

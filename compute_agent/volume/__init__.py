"""Volumes: validation of connection data (no libvirt here); the libvirt
side is in compute_agent/virt/libvirt/volume/."""

"""Networking of instances on this host: bridges and segments (``linux_net``),
DHCP (``dhcp``), security groups (``firewall``), tied together by
``vif.NetworkDriver`` - the API the hypervisor driver calls - and refused
early by ``validate``. See docs/network.md."""

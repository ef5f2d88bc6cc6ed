"""Option definitions, grouped as they appear in compute-agent.conf.

``list_opts`` is the entry point oslo-config-generator uses to write
etc/compute-agent/compute-agent.conf.sample.
"""

import socket

from oslo_config import cfg

default_opts = [
    cfg.StrOpt("host", default=socket.gethostname(), sample_default="<hostname>",
               help="Name of this hypervisor host. It is the RPC server name the "
                    "API/scheduler addresses casts and calls to, so it must be "
                    "unique among the agents sharing one message bus."),
    cfg.StrOpt("instances_path", default="/var/lib/compute-agent/instances",
               help="Where instance directories and the _base image cache live. "
                    "Must be traversable by the QEMU user (libvirt-qemu)."),
    cfg.StrOpt("state_path", default="/var/lib/compute-agent/state",
               help="Where the agent keeps its own database (instances and the "
                    "journal of operation steps) and its lock files."),
    cfg.IntOpt("state_sync_interval", default=60, min=0,
               help="Seconds between periodic power-state syncs with libvirt "
                    "(0 disables). Lifecycle events update states at once; the "
                    "sync catches anything missed."),
    cfg.IntOpt("max_concurrent_disk_ops", default=2, min=0,
               help="How many disk-heavy operations (image fetch and convert) may "
                    "run at once on this host; 0 means unlimited."),
    cfg.IntOpt("shutdown_timeout", default=60, min=0,
               help="Default seconds power_off waits for the guest to power off after "
                    "the ACPI request before it forces it off (0: force at once)."),
    cfg.BoolOpt("allow_resize_same_host", default=False,
                help="Allow resize and cold migration to this same host (the "
                     "destination named or none given). The old disks stay in "
                     "<uuid>_resize until confirm or revert, as for another host."),
    cfg.IntOpt("health_check_interval", default=15, min=1,
               help="Seconds between health checks (libvirt answers; an RPC call to "
                    "this agent through RabbitMQ answers). Under systemd with a "
                    "watchdog, half of WatchdogSec is used instead."),
    cfg.IntOpt("health_unreachable_timeout", default=60, min=1,
               help="When libvirt or RabbitMQ has not answered for this many seconds, "
                    "the agent stops pinging the systemd watchdog (which restarts it)."),
    cfg.PortOpt("metrics_port", default=None,
                help="Serve Prometheus metrics on this port (unset: no endpoint)."),
    cfg.HostAddressOpt("metrics_host", default="127.0.0.1",
                       help="Address the metrics endpoint listens on (loopback by "
                            "default: expose it deliberately)."),
    cfg.IntOpt("graceful_shutdown_timeout", default=60, min=0,
               help="On SIGTERM, seconds to wait for running operations to reach "
                    "the end before the agent exits anyway."),
    cfg.StrOpt("snapshots_directory", sample_default="<instances_path>/snapshots",
               help="Where snapshots keep their temporary copies of root disks (unset: "
                    "<instances_path>/snapshots). A snapshot is refused unless this "
                    "filesystem can hold the copy plus [image] min_free_disk_mb. "
                    "Must be traversable by the QEMU user for live snapshots."),
    cfg.IntOpt("long_rpc_timeout", default=1800, min=1,
               help="Timeout (s) of host-to-host RPC calls that may run long, such as "
                    "preparing a live migration destination (which may fetch images)."),
]

libvirt_opts = [
    cfg.StrOpt("connection_uri", default="qemu:///system",
               help="libvirt connection URI of the local hypervisor."),
    cfg.StrOpt("virt_type", default="kvm", choices=["kvm", "qemu"],
               help="Domain type: kvm (hardware accelerated) or qemu (TCG "
                    "emulation, for hosts where KVM cannot run the guest OS)."),
    cfg.StrOpt("cpu_mode", choices=["none", "host-model", "host-passthrough"],
               help="Guest CPU model. Unset means host-model for kvm and none for "
                    "qemu (TCG's default CPU)."),
    cfg.StrOpt("disk_cachemode", default="none",
               choices=["none", "writeback", "writethrough", "unsafe"],
               help="QEMU cache mode for instance disks. 'none' (O_DIRECT) needs a "
                    "filesystem that supports O_DIRECT (not tmpfs)."),
    cfg.StrOpt("save_path", default="/var/lib/libvirt/qemu/save",
               help="Where libvirtd writes managed-save (suspend) files. Suspend checks "
                    "this filesystem has room for the guest's memory; get_host_status "
                    "reports the space the files take."),
    cfg.IntOpt("save_space_margin_mb", default=256, min=0,
               help="Free space to keep on save_path beyond a suspended guest's memory."),
    cfg.IntOpt("soft_reboot_timeout", default=60, min=1,
               help="Seconds a soft reboot waits for the guest to power off after the "
                    "ACPI request before it falls back to a hard reboot."),
    cfg.IntOpt("machine_memory_reserved_mb", default=512, min=0,
               help="Host memory kept back from guests when reporting capacity."),
    cfg.BoolOpt("live_snapshot", default=True,
                help="Snapshot a running instance live (its root disk mirrored into a copy "
                     "while the guest runs). False: managed-save the guest while its disk "
                     "is copied, then restore it (a pause as long as the copy)."),
    cfg.StrOpt("snapshot_image_format", choices=["raw", "qcow2"],
               help="Disk format of snapshot images. Unset: the instance's base image's "
                    "format (qcow2 when that is unknown)."),
    cfg.IntOpt("snapshot_copy_timeout", default=600, min=1,
               help="Seconds a live snapshot waits for the mirror of the root disk to "
                    "catch up with the guest's writes before it gives up."),
]

# [libvirt] options of live migration (compute_agent/live_migration.py,
# virt/libvirt/migration.py).
live_migration_opts = [
    cfg.StrOpt("live_migration_uri",
               help="libvirt URI by which other hosts reach this host's libvirtd when it "
                    "is a live migration destination, e.g. qemu+tcp://10.0.0.2/system. "
                    "Unset: connection_uri. A URI naming a host makes the source's libvirtd "
                    "migrate peer-to-peer; a local one (qemu:///system) makes the source "
                    "agent drive the migration over its own connection to it."),
    cfg.HostAddressOpt("live_migration_inbound_addr",
                       help="Address the migration stream of an incoming live migration "
                            "is sent to and listened on (tcp://ADDR). Unset: libvirt's "
                            "migration_host/migration_address from qemu.conf."),
    cfg.IntOpt("live_migration_bandwidth", default=0, min=0,
               help="Bandwidth cap of a live migration in MiB/s (0: unlimited)."),
    cfg.IntOpt("live_migration_downtime", default=500, min=100,
               help="Maximum downtime (ms) the guest may be paused for at the end of a "
                    "live migration; the allowed downtime is raised to it in steps."),
    cfg.IntOpt("live_migration_downtime_steps", default=10, min=3,
               help="In how many steps the allowed downtime is raised to "
                    "live_migration_downtime."),
    cfg.IntOpt("live_migration_downtime_delay", default=75, min=3,
               help="Seconds, per GiB of data to transfer, between two downtime steps."),
    cfg.IntOpt("live_migration_completion_timeout", default=800, min=0,
               help="Seconds, per GiB of data to transfer (memory, plus disks for a block "
                    "migration), a live migration may run before "
                    "live_migration_timeout_action is taken (0: no timeout)."),
    cfg.StrOpt("live_migration_timeout_action", default="abort",
               choices=["abort", "force_complete"],
               help="On completion timeout: abort (the guest stays on the source) or "
                    "force_complete (switch to post-copy when permitted, else pause the "
                    "guest so the migration converges)."),
    cfg.BoolOpt("live_migration_permit_post_copy", default=False,
                help="Allow post-copy (the guest runs on the destination while its "
                     "remaining memory is fetched): used by force_complete."),
    cfg.BoolOpt("live_migration_permit_auto_converge", default=False,
                help="Allow QEMU to throttle the guest's vCPUs so a migration converges "
                     "(not combined with post-copy)."),
]

image_opts = [
    cfg.StrOpt("backend", default="local", choices=["local", "glance"],
               help="Image service: 'local' reads images from local_image_dir; 'glance' "
                    "uses the Glance v2 API configured in [glance]."),
    cfg.StrOpt("local_image_dir", default="/var/lib/compute-agent/images",
               help="Directory of the local image service: <id> holds the image "
                    "data, <id>.json its record ({\"disk_format\": \"raw\"|\"qcow2\", "
                    "\"name\": ...})."),
    cfg.ListOpt("allowed_disk_formats", default=["raw", "qcow2"],
                help="Image disk formats the agent accepts; anything else is refused "
                     "before qemu-img reads it."),
    cfg.IntOpt("qemu_img_cpu_time", default=30, min=1,
               help="CPU-seconds limit for each qemu-img run on image data."),
    cfg.IntOpt("qemu_img_address_space_mb", default=1024, min=64,
               help="Address-space limit (MiB) for each qemu-img run that reads image "
                    "metadata (info, map, check). Runs that copy data (convert, rebase) "
                    "are limited in CPU time only: their thread pool needs more."),
    cfg.IntOpt("cache_ageing_interval", default=2400, min=0,
               help="Seconds between image cache ageing passes (0 disables ageing)."),
    cfg.IntOpt("remove_unused_base_images_after", default=86400, min=0,
               help="A base file in _base that no instance on this host uses and that "
                    "was last used this many seconds ago is removed by ageing."),
    cfg.IntOpt("min_free_disk_mb", default=256, min=0,
               help="Free space, beyond what an operation needs, that must remain "
                    "on instances_path after an image fetch or conversion."),
]


def _glance_opts():
    # keystoneauth1's session, auth and adapter options, as Nova has them.
    from keystoneauth1 import loading as ks_loading
    return (ks_loading.get_session_conf_options()
            + ks_loading.get_auth_common_conf_options()
            + ks_loading.get_auth_plugin_conf_options("password")
            + ks_loading.get_adapter_conf_options())


network_opts = [
    cfg.ListOpt("allowed_physical_interfaces", default=[],
                help="Host interfaces a flat or VLAN segment may use "
                     "(segment.physical_interface). A flat segment enslaves the interface "
                     "itself to the network's bridge, which takes its IP traffic away from "
                     "the host: list only interfaces dedicated to guests. A spec naming any "
                     "other interface is refused. Empty: only host-local flat networks "
                     "(no physical_interface) and VXLAN."),
    cfg.IPOpt("vxlan_local_ip", version=4,
              help="Local VTEP address for VXLAN segments (the source of the UDP "
                   "encapsulation). Required for specs with VXLAN segments."),
    cfg.ListOpt("vxlan_remote_ips", default=[],
                help="Remote VTEP addresses: broadcast, unknown-unicast and multicast "
                     "frames of every VXLAN segment are sent to each (forwarding-database "
                     "entries on the vxlan device); unicast destinations are learned."),
    cfg.StrOpt("vxlan_underlay_interface",
               help="Interface the VXLAN traffic leaves by (vxlan 'dev'); unset lets the "
                    "routing table choose. A segment's physical_interface overrides it."),
    cfg.PortOpt("vxlan_udp_port", default=4789, help="UDP port of VXLAN (IANA: 4789)."),
    cfg.StrOpt("dnsmasq_path", default="dnsmasq",
               help="The dnsmasq binary serving DHCP for networks with dhcp=true."),
    cfg.IntOpt("dhcp_lease_time", default=3600, min=120,
               help="Seconds of a DHCP lease (the addresses are static: a renewal "
                    "always gets the same one)."),
    cfg.ListOpt("dhcp_dns_servers", default=[],
                help="DNS servers announced by DHCP (option 6); empty announces none."),
    cfg.BoolOpt("enable_security_groups", default=True,
                help="Filter each port's traffic with iptables/ebtables (security groups "
                     "and anti-spoofing). Turn off only on hosts where another component "
                     "does it."),
    cfg.StrOpt("firewall_lock_file", default="/run/compute-agent-firewall.lock",
               help="Lock file serialising this host's iptables/ebtables updates across "
                    "agent processes (the ca-* chains are shared by all of them)."),
]


volume_opts = [
    cfg.StrOpt("iscsi_initiator", default="qemu", choices=["qemu", "kernel"],
               help="Who logs in to iSCSI targets. qemu: QEMU's own initiator (libiscsi, "
                    "package qemu-block-extra) connects from the guest's process, with CHAP "
                    "credentials in a libvirt secret; no host kernel support needed. "
                    "kernel: the host's open-iscsi initiator through os-brick (needs "
                    "iscsi_tcp, iscsid and the os-brick Python package); the guest gets the "
                    "host block device. The kernel path is not exercised by the functional "
                    "tests (their hosts have no iscsi_tcp)."),
    cfg.ListOpt("allowed_local_volume_dirs", default=[],
                help="Directories under which 'file' and 'block' volumes (device_path) may "
                     "be; a path elsewhere (for file volumes, also after following "
                     "symlinks) is refused. Empty: local volumes are refused. For block "
                     "volumes list the "
                     "directories of the devices meant for guests (e.g. /dev/VG of an LVM "
                     "volume group, whose symlinks are followed), never /dev itself."),
    cfg.IntOpt("detach_timeout", default=20, min=1,
               help="Seconds to wait for libvirt's device-removed event after each request "
                    "to detach a volume from a running guest."),
    cfg.IntOpt("detach_attempts", default=3, min=1,
               help="How many times a detach is requested before it is reported as failed "
                    "(the guest does not let go of the disk); the volume then stays "
                    "attached."),
]


def agent_opts():
    """Every group but [glance], whose options keystoneauth1 registers itself."""
    return [
        ("DEFAULT", default_opts),
        ("libvirt", libvirt_opts + live_migration_opts),
        ("image", image_opts),
        ("network", network_opts),
        ("volume", volume_opts),
    ]


def list_opts():
    """For oslo-config-generator: everything, [glance] included."""
    return agent_opts() + [("glance", _glance_opts())]

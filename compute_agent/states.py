"""Instance states (Nova's names) and which operation may start from which.

An operation is allowed when the instance has no task in progress and its
vm_state is one of the states listed for that operation. Anything else is
refused with the current states named, and nothing is changed.
"""

# vm_state
BUILDING = "building"
ACTIVE = "active"
STOPPED = "stopped"
SUSPENDED = "suspended"
RESIZED = "resized"
ERROR = "error"
DELETED = "deleted"

# task_state
SPAWNING = "spawning"
DELETING = "deleting"
REBOOTING = "rebooting"
REBOOTING_HARD = "rebooting_hard"
POWERING_OFF = "powering_off"
POWERING_ON = "powering_on"
SUSPENDING = "suspending"
RESUMING = "resuming"
IMAGE_SNAPSHOT = "image_snapshot"
IMAGE_UPLOADING = "image_uploading"
MIGRATING = "migrating"
RESIZE_PREP = "resize_prep"
RESIZE_MIGRATING = "resize_migrating"
RESIZE_FINISH = "resize_finish"
RESIZE_CONFIRMING = "resize_confirming"
RESIZE_REVERTING = "resize_reverting"

# power_state
NOSTATE = "nostate"
RUNNING = "running"
PAUSED = "paused"
SHUTDOWN = "shutdown"
CRASHED = "crashed"
SUSPENDED_POWER = "suspended"

# operation -> (vm_states it may start from, task_state while it runs)
ALLOWED = {
    "delete": ({BUILDING, ACTIVE, STOPPED, SUSPENDED, RESIZED, ERROR}, DELETING),
    "reboot_soft": ({ACTIVE}, REBOOTING),
    # Hard reboot is the repair tool: after reset_state it fixes an instance
    # whatever happened to it (see reset_state).
    "reboot_hard": ({ACTIVE, STOPPED, ERROR}, REBOOTING_HARD),
    "power_off": ({ACTIVE, ERROR}, POWERING_OFF),
    "power_on": ({STOPPED}, POWERING_ON),
    # A suspended instance cannot be migrated, resized or snapshotted with its
    # memory: those are refused here with the state named.
    "suspend": ({ACTIVE}, SUSPENDING),
    "resume": ({SUSPENDED}, RESUMING),
    # Discarding saved memory is explicit and also allowed after a failed
    # restore left the instance in error with its save file kept.
    "resume_discard": ({SUSPENDED, ERROR}, RESUMING),
    # Rules change while the guest runs (or is stopped/suspended); no task_state:
    # the instance lock serialises it with other operations.
    "update_security_groups": ({ACTIVE, STOPPED, SUSPENDED}, None),
    # The root disk becomes a new image: live while running, cold otherwise (a
    # suspended instance stays suspended). task_state moves on to
    # image_uploading; a failure leaves vm_state as it was.
    "snapshot": ({ACTIVE, STOPPED, SUSPENDED}, IMAGE_SNAPSHOT),
    # Volumes: live and persistent while running, persistent only while
    # stopped. No task_state (like update_security_groups): the instance lock
    # serialises them; a failure leaves vm_state as it was.
    "attach_volume": ({ACTIVE, STOPPED}, None),
    "detach_volume": ({ACTIVE, STOPPED}, None),
    # Live migration moves a running guest; a suspended one has no running
    # guest to move (and its save file is host-local): refused, state named.
    "live_migrate": ({ACTIVE}, MIGRATING),
    # Resize / cold migration (resize.py): the guest is shut down first; a
    # suspended one would lose its saved memory: refused, state named.
    "resize": ({ACTIVE, STOPPED}, RESIZE_PREP),
    "confirm_resize": ({RESIZED}, RESIZE_CONFIRMING),
    "revert_resize": ({RESIZED}, RESIZE_REVERTING),
}


def check_allowed(action: str, vm_state: str, task_state: str | None) -> bool:
    vm_states, _ = ALLOWED[action]
    if action == "delete" and vm_state == ERROR:
        # An instance in error may be deleted whatever task it was stuck in.
        return True
    return task_state is None and vm_state in vm_states


def task_state_for(action: str) -> str:
    return ALLOWED[action][1]

"""One exception hierarchy for the whole agent.

Every error carries a message an operator can act on. The classes travel over
RPC: oslo.messaging rebuilds them on the client side (the client allows this
module in ``allowed_remote_exmods``), so a caller sees ``InvalidSpec`` rather
than a generic RemoteError.
"""


class ComputeAgentError(Exception):
    """Base class. Subclasses set ``msg_fmt``, formatted with the kwargs."""

    msg_fmt = "An unknown error occurred."

    def __init__(self, message: str | None = None, **kwargs):
        self.kwargs = kwargs
        if message is None:
            try:
                message = self.msg_fmt % kwargs
            except (KeyError, TypeError):
                message = f"{self.msg_fmt} ({kwargs})"
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


def message_of(exc: BaseException) -> str:
    """An exception's message without a remote traceback (oslo.messaging appends
    one to errors it could not rebuild): what a fault or a peer's reply shows."""
    message = getattr(exc, "message", None)
    if isinstance(message, str) and message:
        return message
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if text.strip() else type(exc).__name__


# --- requests the agent refuses -------------------------------------------

class Invalid(ComputeAgentError):
    msg_fmt = "Invalid request: %(reason)s"


class InvalidSpec(Invalid):
    msg_fmt = "Invalid instance spec: field '%(field)s' %(reason)s"


class InvalidArgument(Invalid):
    msg_fmt = "Invalid argument '%(name)s': %(reason)s"


class InvalidState(Invalid):
    msg_fmt = ("Cannot %(action)s instance %(uuid)s while vm_state=%(vm_state)s "
               "task_state=%(task_state)s")


class InstanceExists(Invalid):
    msg_fmt = "Instance %(uuid)s already exists on this host"


class NotSupported(Invalid):
    msg_fmt = "%(what)s is not supported by this agent yet"


class SavedStateExists(Invalid):
    msg_fmt = ("Instance %(uuid)s has saved memory state (managed save); resume it, or "
               "discard the saved state explicitly with resume(discard_saved_state=True)")


class NotFound(ComputeAgentError):
    msg_fmt = "Not found: %(what)s"


class InstanceNotFound(NotFound):
    msg_fmt = "Instance %(uuid)s is not known to this host"


class ImageNotFound(NotFound):
    msg_fmt = "Image %(image_id)s was not found in the image service"


# --- images ----------------------------------------------------------------

class ImageUnacceptable(Invalid):
    msg_fmt = "Image %(image_id)s is unacceptable: %(reason)s"


class ImageFetchFailed(ComputeAgentError):
    msg_fmt = "Fetching image %(image_id)s failed: %(reason)s"


class ImageUploadFailed(ComputeAgentError):
    msg_fmt = "Uploading image %(image_id)s failed: %(reason)s"


# --- snapshots ---------------------------------------------------------------

class SnapshotFailed(ComputeAgentError):
    msg_fmt = "Snapshot of instance %(uuid)s failed: %(reason)s"


class QuiesceNotSupported(Invalid):
    msg_fmt = ("Instance %(uuid)s cannot be quiesced for a live snapshot: %(reason)s; its image "
               "requires it (os_require_quiesce)")


# --- the host --------------------------------------------------------------

class InsufficientDiskSpace(ComputeAgentError):
    msg_fmt = ("Not enough free space on %(path)s for %(purpose)s: need %(needed_mb)d MiB, "
               "%(free_mb)d MiB free")


class DiskMissing(ComputeAgentError):
    msg_fmt = ("The root disk %(path)s is missing; refusing to recreate it from the image "
               "(the instance's data would be silently replaced)")


class RestoreFailed(ComputeAgentError):
    msg_fmt = ("Restoring the saved memory state of %(uuid)s failed: %(reason)s. The save "
               "file is kept; to discard it and cold-boot, resume with "
               "discard_saved_state=True")


class HypervisorUnavailable(ComputeAgentError):
    msg_fmt = "Cannot reach the hypervisor at %(uri)s: %(reason)s"


class HypervisorError(ComputeAgentError):
    msg_fmt = "libvirt %(call)s failed: %(reason)s"


class CommandFailed(ComputeAgentError):
    msg_fmt = "%(cmd)s failed (exit %(exit_code)s): %(stderr)s"


# --- networking --------------------------------------------------------------

class NetworkError(ComputeAgentError):
    msg_fmt = "Network setup failed: %(reason)s"


class NetworkConflict(NetworkError):
    msg_fmt = "Network conflict on this host: %(reason)s"


class FirewallError(ComputeAgentError):
    msg_fmt = "Applying security group rules failed: %(reason)s"


# --- volumes -------------------------------------------------------------------

class VolumeError(ComputeAgentError):
    msg_fmt = "Volume %(volume_id)s: %(reason)s"


class VolumeConnectFailed(VolumeError):
    msg_fmt = "Connecting volume %(volume_id)s failed: %(reason)s"


class VolumeAttachFailed(VolumeError):
    msg_fmt = "Attaching volume %(volume_id)s failed: %(reason)s"


class VolumeDetachFailed(VolumeError):
    msg_fmt = "Volume %(volume_id)s is still attached to instance %(uuid)s: %(reason)s"


# --- live migration ------------------------------------------------------------

class MigrationPreCheckError(Invalid):
    """A check before anything moved said no: the instance is untouched."""

    msg_fmt = "Cannot live-migrate instance %(uuid)s to %(dest)s: %(reason)s"


class LiveMigrationFailed(ComputeAgentError):
    msg_fmt = "Live migration of instance %(uuid)s to %(dest)s failed: %(reason)s"


class LiveMigrationAborted(LiveMigrationFailed):
    msg_fmt = "Live migration of instance %(uuid)s to %(dest)s was aborted: %(reason)s"


class ResizePreCheckError(MigrationPreCheckError):
    msg_fmt = "Cannot resize instance %(uuid)s to %(dest)s: %(reason)s"


class ResizeFailed(ComputeAgentError):
    msg_fmt = "Resize of instance %(uuid)s to %(dest)s failed: %(reason)s"


class NoLiveMigration(Invalid):
    msg_fmt = "Instance %(uuid)s has no live migration in progress on this host"

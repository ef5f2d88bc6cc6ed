"""qemu-img is run with explicit formats and under the right limits."""

from unittest import mock

from compute_agent import qemu_img
from compute_agent.conf import CONF


def _prlimit_of(call):
    return call.kwargs["prlimit"]


@mock.patch("oslo_concurrency.processutils.execute", return_value=('{"format": "raw", '
            '"virtual-size": 1, "actual-size": 1}', ""))
def test_metadata_reads_are_capped_in_address_space(execute):
    qemu_img.info("/x", "raw")
    limits = _prlimit_of(execute.call_args)
    assert execute.call_args.args[:3] == ("qemu-img", "info", "-f")
    assert limits.address_space == CONF.image.qemu_img_address_space_mb * 1024 * 1024
    assert limits.cpu_time == CONF.image.qemu_img_cpu_time


@mock.patch("oslo_concurrency.processutils.execute", return_value=("", ""))
def test_data_copies_are_capped_in_cpu_time_only(execute):
    for run in (lambda: qemu_img.convert_to_raw("/a", "qcow2", "/b"),
                lambda: qemu_img.convert("/a", "qcow2", "/b", "qcow2"),
                lambda: qemu_img.rebase_standalone("/a")):
        run()
        limits = _prlimit_of(execute.call_args)
        assert limits.address_space is None
        assert limits.cpu_time == CONF.image.qemu_img_cpu_time * 20


@mock.patch("oslo_concurrency.processutils.execute", return_value=("", ""))
def test_creating_an_overlay_runs_without_the_prlimit_wrapper(execute):
    qemu_img.create_overlay("/o", "/base", 1024)
    assert _prlimit_of(execute.call_args) is None
    assert "-F" in execute.call_args.args

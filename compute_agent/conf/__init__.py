"""Configuration: every option the agent reads, registered on one ConfigOpts.

The daemon uses the global ``CONF``; tests and the CLI may build their own
``cfg.ConfigOpts()`` and call :func:`register_opts` on it.
"""

from oslo_config import cfg

from compute_agent.conf import opts

CONF = cfg.CONF


def register_opts(conf: cfg.ConfigOpts) -> None:
    # [glance] is registered by keystoneauth1 itself (its auth plugins are
    # dynamic), and only when the Glance backend is used: see image/service.py.
    for group, options in opts.agent_opts():
        conf.register_opts(options, group=None if group == "DEFAULT" else group)


register_opts(CONF)

"""Configuration: every option the agent reads, registered on one ConfigOpts.

The daemon uses the global ``CONF``; tests and the CLI may build their own
``cfg.ConfigOpts()`` and call :func:`register_opts` on it.
"""

from oslo_config import cfg

from compute_agent.conf import opts

CONF = cfg.CONF


def register_opts(conf: cfg.ConfigOpts) -> None:
    for group, options in opts.list_opts():
        if group == "glance":
            continue  # keystoneauth1 registers these itself (auth plugins are dynamic)
        conf.register_opts(options, group=None if group == "DEFAULT" else group)
    from compute_agent.image import glance
    glance.register_opts(conf)


register_opts(CONF)

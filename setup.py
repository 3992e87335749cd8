"""The one compiled part: `kvmw serve`'s GET/SET/PING loop (integrations/server/_fastpath.c).

Optional: where no C compiler is found kvmw installs without it and `kvmw serve` runs
every command through its Python path (`kvmw serve --help` and INFO say which).
Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvmw.integrations.server._fastpath", ["integrations/server/_fastpath.c"],
                             extra_compile_args=["-O2"], optional=True)])

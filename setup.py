"""Build step for the timm hook; all metadata lives in pyproject.toml.

Ships ``timm_autodecay-hook.pth`` into site-packages, for ``pip install .`` and ``pip install -e .``
alike. At interpreter start-up it runs ``timm_autodecay.timm_hook.install()``, which only puts a small
finder on ``sys.meta_path`` (no timm, no torch import): ``autodecay`` is registered in
``timm.scheduler`` when, and only if, a program imports it. The file name sorts after setuptools'
``__editable__.*.pth``, so an editable install's finder is in place when this line runs. If the package
cannot be imported (an editable install whose checkout was moved or deleted), the line does nothing.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "timm_autodecay-hook.pth"
# Inside try: once the package is gone (an editable install's checkout moved or deleted), every
# interpreter start must stay silent. A .pth line runs only if it starts with "import".
PTH_LINE = (
    'import sys; exec("try:\\n import timm_autodecay.timm_hook as hook\\nexcept ImportError:\\n pass\\n'
    'else:\\n hook.install()")\n'
)


class build_py_with_hook(build_py):
    """build_py, plus the .pth file at the top of the installed tree."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            # PEP 660: build_lib is discarded; setuptools' editable_wheel points install_lib at the
            # unpacked wheel, whose top-level files land in site-packages.
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.mkpath(target)
        with open(os.path.join(target, PTH_NAME), "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


setup(cmdclass={"build_py": build_py_with_hook})

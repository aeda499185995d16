"""Every module of the package imports first, in a fresh interpreter.

A job imports one module first (the released_results job ``osref.released_results``, the report job
``osref.report``, a test ``osref.compare``), so an import cycle shows only for some orders and only
in a fresh interpreter: a test session that happened to import the other side first passes. Two
cycles reached main this way (entry.py took a name from released_results; compare.py from
report.tables, whose package imports html, which imports compare).
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import osref

MODULES = sorted(module.name for module in pkgutil.walk_packages(osref.__path__, "osref."))


def test_the_package_has_its_modules():
    assert {"osref.compare", "osref.report", "osref.report.html", "osref.released_results"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

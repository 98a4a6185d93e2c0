"""The documentation: the site builds with `mkdocs build --strict`, and every ```python block runs."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _python_blocks():
    for page in PAGES:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for m in _FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 2
            yield pytest.param(page, line, m.group(1), id=f"{page}:{line}")


@pytest.fixture
def backend_registry():
    """The backend registry is process-wide (the tests' own rows live in it): a block must leave
    it as it found it, and is undone either way so that one bad page cannot break later tests."""
    from lookahead_ext import ops
    from lookahead_ext.ops import backend as registry
    saved = dict(registry.REGISTRY)
    yield
    changed = dict(registry.REGISTRY) != saved
    if changed:
        for name in list(registry.REGISTRY):
            ops.unregister_backend(name)
        for name, e in saved.items():  # in the saved order: it is the order of the test rows
            ops.register_backend(name, e.target, alias_of=e.alias_of, devices=e.devices)
    assert not changed, "the block changed the backend registry (a doc example must undo its changes)"


@pytest.mark.parametrize("page,line,code", list(_python_blocks()))
def test_python_block_runs(page, line, code, tmp_path, monkeypatch, backend_registry):
    """Each block standalone (its own namespace, a scratch working directory), on CPU.

    Snippets that cannot run here belong in another fence (```text, ```bash).
    """
    monkeypatch.chdir(tmp_path)
    # Line numbers in tracebacks point into the page: pad the code to its line in the file
    exec(compile("\n" * (line - 1) + code, os.path.join(ROOT, page), "exec"), {"__name__": "__main__"})


def test_readme_is_short_and_links_exist():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert text.count("\n") <= 250
    for target in re.findall(r"\]\(((?:docs|bench)/[^)#]+)", text):
        assert os.path.exists(os.path.join(ROOT, target)), target


def test_nav_lists_every_page():
    nav = re.findall(r":\s*(\S+\.md)\s*$", open(os.path.join(ROOT, "mkdocs.yml")).read(), re.M)
    pages = sorted(os.path.basename(p) for p in PAGES if p.startswith("docs"))
    assert sorted(nav) == pages


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install mkdocs-material 'mkdocstrings[python]')")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert (tmp_path / "site" / "optimizers" / "index.html").exists()
    # the generated benchmark tables are included, not copied
    assert "combine_step_" in (tmp_path / "site" / "benchmarks" / "index.html").read_text()

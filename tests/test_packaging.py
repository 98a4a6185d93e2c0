"""Packaging: the sdist's contents, a wheel built from it, the build-isolation stop, the fallback warning."""
import glob
import hashlib
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest
import torch

import lookahead_ext

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where the wheel test unpacks the sdist and builds: kept between runs (ignored by git), so
# an unchanged sdist rebuilds nothing (ninja sees the same sources and objects).
BUILD_CACHE = os.path.join(ROOT, "build", "pkgtest")


def _run(cmd, cwd=ROOT, env=None, timeout=900):
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    """PYTHONPATH entry whose `torch` cannot be imported: the situation of an isolated build."""
    d = tmp_path_factory.mktemp("no_torch")
    os.makedirs(d / "torch")
    (d / "torch" / "__init__.py").write_text("raise ImportError('torch hidden: simulated build isolation')\n")
    return {"PYTHONPATH": str(d)}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory, no_torch):
    """The sdist, built as pip's isolated build would: without an importable torch."""
    out = tmp_path_factory.mktemp("sdist")
    r = _run([sys.executable, "-c", f"from setuptools import build_meta as b; print(b.build_sdist({str(out)!r}))"],
             env=no_torch)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return str(out / r.stdout.strip().splitlines()[-1])


def test_version_single_sourced():
    meta = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    assert "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lookahead_ext._version.__version__"}
    from lookahead_ext._version import __version__
    assert lookahead_ext.__version__ == __version__
    for path in ("setup.py", "pyproject.toml"):  # written nowhere else
        assert __version__ not in open(os.path.join(ROOT, path)).read(), path


def test_torch_minimum_is_what_the_code_needs():
    meta = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    assert "torch>=2.4" in meta["project"]["dependencies"]
    # torch.library.register_fake (new in 2.4) is what sets the minimum
    assert "torch.library.register_fake" in open(os.path.join(ROOT, "lookahead_ext", "ops", "native.py")).read()


def test_sdist_carries_sources_and_builds_without_torch(sdist):
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    wanted = [os.path.relpath(p, ROOT) for pattern in ("csrc/**/*.h", "csrc/**/*.cuh", "csrc/**/*.cpp",
                                                        "csrc/**/*.cu", "kernels/*.py")
              for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)]
    assert any(w.endswith(".cu") for w in wanted) and any(w.endswith(".h") for w in wanted)
    missing = sorted(set(wanted) - names)
    assert not missing, f"sdist lacks {missing}"
    for f in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "CMakeLists.txt",
              "lookahead_ext/_version.py", "lookahead_ext/ops/native.py"):
        assert f in names, f
    assert not [n for n in names if n.endswith((".so", ".pyc"))]


def _sdist_build_dir(sdist):
    """Unpack the sdist into BUILD_CACHE/<hash of its contents> (reused when unchanged)."""
    h = hashlib.sha256()
    with tarfile.open(sdist) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if m.isfile() and "egg-info" not in m.name and not m.name.endswith("PKG-INFO"):
                h.update(m.name.encode() + tf.extractfile(m).read())
        top = tf.getnames()[0].split("/")[0]
        dest = os.path.join(BUILD_CACHE, h.hexdigest()[:16])
        if not os.path.isdir(os.path.join(dest, top)):
            for old in glob.glob(os.path.join(BUILD_CACHE, "*")):  # one cached build at a time
                subprocess.run(["rm", "-rf", old], check=True)
            tf.extractall(dest)
    return os.path.join(dest, top)


@pytest.mark.slow
def test_wheel_from_sdist_carries_the_extension(sdist, tmp_path):
    src = _sdist_build_dir(sdist)
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
              "-w", str(tmp_path), src], env={"LOOKAHEAD_EXT_NO_CUDA": "1", "PIP_NO_INPUT": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = glob.glob(str(tmp_path / "*.whl"))
    names = zipfile.ZipFile(whl).namelist()
    so = [n for n in names if n.startswith("lookahead_ext/_C.") and n.endswith(".so")]
    assert so, f"no lookahead_ext/_C in {os.path.basename(whl)}"
    assert "lookahead_ext/kernels/combine_step.py" in names and "lookahead_ext/_version.py" in names
    tag = os.path.basename(whl).split("-")[2:4]
    import torch.utils.cpp_extension
    min_py = getattr(torch.utils.cpp_extension, "min_supported_cpython", None)
    if min_py:  # torch >= 2.6: Python's stable ABI from torch's minimum CPython on
        assert tag == [f"cp{int(min_py[2:4], 16)}{int(min_py[4:6], 16)}", "abi3"], tag
        assert so == ["lookahead_ext/_C.abi3.so"], so
    meta = zipfile.ZipFile(whl).read(f"lookahead_ext-{lookahead_ext.__version__}.dist-info/METADATA").decode()
    assert "Requires-Dist: torch>=2.4" in meta
    # the unpacked wheel imports and its C++ backend works (not the editable source tree)
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(whl).extractall(unpacked)
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(unpacked)!r})
        import torch, lookahead_ext as la
        assert la.__file__.startswith({str(unpacked)!r}), la.__file__
        assert la.ops.available_backends()["cpp"] == "ok", la.ops.available_backends()
        assert la.ops.resolve("auto", torch.device("cpu"), torch.float32).name == "native"
    """)
    r = _run([sys.executable, "-c", code], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]


def test_build_without_torch_stops_with_the_message(no_torch, tmp_path):
    r = _run([sys.executable, "setup.py", "bdist_wheel", "-d", str(tmp_path)], env=no_torch, timeout=300)
    assert r.returncode != 0
    assert "--no-build-isolation" in r.stderr and "LOOKAHEAD_EXT_NO_CPP=1" in r.stderr, r.stderr[-2000:]
    assert not glob.glob(str(tmp_path / "*.whl"))


def test_pure_python_build_only_on_request(no_torch, tmp_path):
    r = _run([sys.executable, "setup.py", "-q", "bdist_wheel", "-d", str(tmp_path), "-b", str(tmp_path / "b")],
             env={**no_torch, "LOOKAHEAD_EXT_NO_CPP": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = glob.glob(str(tmp_path / "*.whl"))
    assert whl.endswith("-py3-none-any.whl")
    assert not [n for n in zipfile.ZipFile(whl).namelist() if n.endswith(".so")]


@pytest.mark.slow
def test_pip_isolated_build_fails_with_the_message(sdist, tmp_path):
    """The real thing: pip's default (isolated) build of the sdist stops and says what to do."""
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), sdist],
             env={"PIP_NO_INPUT": "1"})
    out = r.stdout + r.stderr
    if "--no-build-isolation" not in out and ("Could not find a version" in out or "No matching distribution" in out):
        pytest.skip("pip could not install setuptools into the isolated build environment (offline?)")
    assert r.returncode != 0, out[-2000:]
    assert "--no-build-isolation" in out and "torch is not importable" in out, out[-3000:]
    assert not glob.glob(str(tmp_path / "*.whl"))


_FALLBACK = """
import sys, warnings
sys.modules["lookahead_ext._C"] = None   # the compiled extension is missing
import torch, lookahead_ext as la
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as w64:
    la.ops.sq_norm([torch.ones(3, dtype=torch.float64)])        # reference by design: silent
    la.ops.sq_norm([torch.ones(3)], backend="reference")          # chosen: silent
with warnings.catch_warnings(record=True) as w:
    la.ops.sq_norm([torch.ones(3)])
    p = torch.nn.Parameter(torch.ones(4))
    opt = la.CMLR([p], lr=0.1, k=2)
    def closure():
        loss = (p * p).sum(); loss.backward(); return loss
    opt.step(closure); opt.step(closure)
print(len(w64), len([x for x in w if x.category is RuntimeWarning]))
print([str(x.message) for x in w][0])
"""


def test_auto_fallback_warns_once_when_extension_missing(tmp_path):
    r = _run([sys.executable, "-c", _FALLBACK], cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    counts, message = r.stdout.splitlines()[:2]
    assert counts == "0 1", r.stdout
    assert "reference" in message and "lookahead_ext._C" in message and "--no-build-isolation" in message


def test_no_warning_when_extension_built(tmp_path):
    if lookahead_ext.ops.available_backends()["cpp"] != "ok":
        pytest.skip("lookahead_ext._C is not built here")
    code = _FALLBACK.replace('sys.modules["lookahead_ext._C"] = None', "")
    r = _run([sys.executable, "-c", code.replace("print([str(x.message) for x in w][0])", "")],
             cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["0", "0"], r.stdout

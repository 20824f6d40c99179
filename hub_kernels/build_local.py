"""Build a kernel variant locally, without kernel-builder or Nix, in the layout the kernels library loads.

    python hub_kernels/build_local.py dcnv3 --backend cpu|cuda [--cuda-archs 8.0 9.0]

Reads `hub_kernels/<kernel>/build.toml`, compiles the torch binding with the sources of the requested backend
through `torch.utils.cpp_extension`, and writes `hub_kernels/<kernel>/build/<variant>/` (the shared library,
`_ops.py`, the Python package files and `metadata.json`), where `kernels.get_local_kernel` and
`LocalLayerRepository` find it. The variant name follows the installed torch (for example
`torch213-cxx11-cpu-x86_64-linux`, or `torch214-cxx11-cu130-x86_64-linux` with a CUDA build of torch; no GPU is
needed to compile). Such builds are for development and tests: Hub releases are built with kernel-builder.
Needs Python 3.11 or newer (tomllib), like the development environment `scripts/setup_env.sh` makes.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path


KERNELS_ROOT = Path(__file__).resolve().parent

# What kernel-builder generates as `registration.h`: the TORCH_LIBRARY macros over the per-build namespace, and a
# Python module entry point so the shared library imports as `<ops name>`.
REGISTRATION_HEADER = """#pragma once
#include <Python.h>

#define _CONCAT(A, B) A##B
#define CONCAT(A, B) _CONCAT(A, B)
#define _STRINGIFY(A) #A
#define STRINGIFY(A) _STRINGIFY(A)

#define TORCH_LIBRARY_EXPAND(NAME, MODULE) TORCH_LIBRARY(NAME, MODULE)
#define TORCH_LIBRARY_IMPL_EXPAND(NAME, DEVICE, MODULE) TORCH_LIBRARY_IMPL(NAME, DEVICE, MODULE)

#define REGISTER_EXTENSION(NAME)                                                                  \\
  PyMODINIT_FUNC CONCAT(PyInit_, NAME)() {                                                         \\
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, STRINGIFY(NAME), nullptr, 0, nullptr}; \\
    return PyModule_Create(&module);                                                                \\
  }
"""

OPS_MODULE = '''import torch

from . import {ops_name}

ops = torch.ops.{ops_name}


def add_op_namespace_prefix(op_name: str) -> str:
    """Prefix an op name with this build's namespace."""
    return f"{ops_name}::{{op_name}}"
'''


def variant_name(backend: str) -> str:
    import torch

    version = "".join(torch.__version__.split("+")[0].split(".")[:2])
    abi = "cxx11" if torch.compiled_with_cxx11_abi() else "cxx98"
    if backend == "cuda":
        if torch.version.cuda is None:
            raise SystemExit("error: --backend cuda needs a CUDA build of torch (e.g. pip install torch==2.14.1)")
        compute = "cu" + torch.version.cuda.replace(".", "")
    else:
        compute = "cpu"
    return f"torch{version}-{abi}-{compute}-{platform.machine()}-{platform.system().lower()}"


def source_revision(kernel_dir: Path) -> str:
    """Short git revision of the last commit that changed the kernel sources, with `_dirty` when they have
    uncommitted changes: a build goes stale when its sources change, not with every commit of the project."""

    def git(*args: str) -> str:
        try:
            result = subprocess.run(["git", *args], cwd=kernel_dir, capture_output=True, text=True)
        except FileNotFoundError:  # no git on the machine (a bare GPU image, say)
            return ""
        return result.stdout.strip() if result.returncode == 0 else ""

    revision = git("log", "-1", "--format=%h", "--abbrev=7", "--", ".") or "0000000"
    return revision + ("_dirty" if git("status", "--porcelain", "--", ".") else "")


def backend_sections(build: dict, backend: str) -> list[dict]:
    sections = [section for section in build.get("kernel", {}).values() if section.get("backend") == backend]
    if backend not in build["general"]["backends"] or not sections:
        raise SystemExit(f"error: build.toml declares no {backend} kernel")
    return sections


def compile_library(kernel_dir: Path, build: dict, backend: str, ops_name: str, work_dir: Path, archs: list[str]):
    from torch.utils import cpp_extension

    sections = backend_sections(build, backend)
    sources = [kernel_dir / src for src in build["torch"]["src"] if src.endswith((".cpp", ".cu"))]
    sources += [kernel_dir / src for section in sections for src in section["src"] if src.endswith((".cpp", ".cu"))]
    includes = [kernel_dir, kernel_dir / "torch-ext", work_dir]
    includes += [kernel_dir / inc for section in sections for inc in section.get("include", [])]
    (work_dir / "registration.h").write_text(REGISTRATION_HEADER)
    define = "-DCUDA_KERNEL" if backend == "cuda" else "-DCPU_KERNEL"
    cflags = ["-O3", define]  # the C++ standard is torch's own (C++17 up to 2.13, C++20 from 2.14)
    cflags += [flag for section in sections for flag in section.get("cxx-flags", [])]
    cuda_flags = ["-O3", define, "--expt-relaxed-constexpr"]
    cuda_flags += [flag for section in sections for flag in section.get("cuda-flags", [])]
    if backend == "cuda":
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    cpp_extension.load(
        name=ops_name,
        sources=[str(source) for source in sources],
        extra_include_paths=[str(path) for path in includes],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        extra_ldflags=[flag for flag in cflags if flag == "-fopenmp"],
        build_directory=str(work_dir),
        is_python_module=False,
        verbose=False,
    )
    return work_dir / f"{ops_name}.so"


def write_variant(
    kernel_dir: Path, build: dict, backend: str, library: Path, ops_name: str, variant_dir: Path, archs: list[str]
) -> None:
    name = build["general"]["name"]
    package_dir = kernel_dir / "torch-ext" / name.replace("-", "_")
    shutil.copytree(package_dir, variant_dir, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(library, variant_dir / f"{ops_name}.abi3.so")
    (variant_dir / "_ops.py").write_text(OPS_MODULE.format(ops_name=ops_name))
    backend_info = {"type": backend, **({"archs": archs} if backend == "cuda" else {})}
    metadata = {
        "name": name,
        "id": ops_name,
        "version": build["general"]["version"],
        "license": build["general"].get("license"),
        "upstream": build["general"].get("upstream"),
        "backend": backend_info,
        "python-depends": build["general"].get("python-depends", []),
    }
    (variant_dir / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")


def build_variant(kernel: str, backend: str, archs: list[str]) -> Path:
    kernel_dir = KERNELS_ROOT / kernel
    build = tomllib.loads((kernel_dir / "build.toml").read_text())
    name = build["general"]["name"].replace("-", "_")
    ops_name = f"_{name}_{backend}_{source_revision(kernel_dir)}"
    variant = variant_name(backend)
    output_root = kernel_dir / "build"
    output_root.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{variant}.", dir=output_root) as work:
        work_dir = Path(work)
        compile_dir = work_dir / "compile"
        compile_dir.mkdir()
        library = compile_library(kernel_dir, build, backend, ops_name, compile_dir, archs)
        staged = work_dir / variant
        write_variant(kernel_dir, build, backend, library, ops_name, staged, archs)
        target = output_root / variant
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", help="kernel directory under hub_kernels/, e.g. dcnv3")
    parser.add_argument("--backend", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--cuda-archs", nargs="+", default=["8.0", "9.0"], help="compute capabilities to build")
    args = parser.parse_args(argv)
    if not (KERNELS_ROOT / args.kernel / "build.toml").is_file():
        parser.error(f"no build.toml under hub_kernels/{args.kernel}")
    target = build_variant(args.kernel, args.backend, args.cuda_archs)
    print(f"built {target.relative_to(KERNELS_ROOT.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Writing a converted model directory so that nothing is lost: the result is built in a hidden staging directory
beside the target and moved into place in one step, an existing target is replaced only when asked, and at every
instant the target holds either the complete old directory or the complete new one (kill -9 included).

Staging directories are named `.<target>.<pid>-<random>.partial`; one whose process no longer runs was left by an
interrupted conversion, and the next conversion to the same target removes it and says so.
"""

import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from checkpoint_sources import ConversionError


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_LIBC = ctypes.CDLL(None, use_errno=True)
_RENAMEAT2 = getattr(_LIBC, "renameat2", None)


def _renameat2(source: Path, destination: Path, flags: int) -> bool:
    """Linux renameat2; False where the system or file system does not offer it (the caller then locks)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(destination))


@contextmanager
def _target_lock(target: Path) -> Iterator[None]:
    """Serialises the final move between conversions to one target where renameat2 is missing."""
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> Path | None:
    """Move `staging` to `target`. Returns the path now holding the replaced directory (to delete), or None.

    Without `overwrite` an existing target, including one that appeared while the conversion ran, is an error.
    With it, the two directories are exchanged atomically where the system allows it.
    """
    exists_message = f"{target} appeared while converting (another process?); pass --overwrite to replace it"
    if not overwrite or not target.exists():
        try:
            if _renameat2(staging, target, _RENAME_NOREPLACE):
                return None
        except FileExistsError:
            raise ConversionError(exists_message) from None
        with _target_lock(target):
            if target.exists():
                raise ConversionError(exists_message)
            staging.rename(target)
        return None
    if _renameat2(staging, target, _RENAME_EXCHANGE):
        return staging
    with _target_lock(target):  # no atomic exchange here: the target is missing between the two renames
        retired = staging.with_name(staging.name.removesuffix(".partial") + ".old")
        target.rename(retired)
        staging.rename(target)
    return retired


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[^.]+\.(partial|old)$")


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(target: Path, log: Callable[[str], None]) -> None:
    """Delete staging directories for `target` that an interrupted conversion left behind, reporting each."""
    if not target.parent.is_dir():
        return
    for path in target.parent.iterdir():
        match = _LEFTOVER.match(path.name)
        if match and match["name"] == target.name and not _process_is_running(int(match["pid"])):
            size = sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed {path.name} ({size / 1e6:.1f} MB), left by an interrupted conversion to {target}")


def write_atomically(target: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Run `write` into a staging directory beside `target`, then move it into place (see the module doc)."""
    if target.exists() and not overwrite:
        raise ConversionError(f"{target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".partial", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        write(staging)
        replaced = _move_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def check_output_target(output_dir: Path, inputs: dict[str, Path | None]) -> None:
    """Refuse an output directory that is or holds the working directory, or is, holds or lies inside a file or
    directory the conversion reads (`inputs`: role -> path)."""
    target = output_dir.resolve()
    if target.exists() and not target.is_dir():
        raise ConversionError(f"--output-dir {output_dir} is a file, not a directory")
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise ConversionError(
            f"--output-dir {output_dir} is the current directory or one of its parents; name a new directory"
        )
    for role, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        source = Path(path).resolve()
        if target == source or target in source.parents or source in target.parents:
            raise ConversionError(f"--output-dir {output_dir} overlaps the {role} {path} that the conversion reads")
    existing = next(p for p in (target.parent, *target.parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConversionError(f"cannot write --output-dir {output_dir}: {existing} is not a writable directory")

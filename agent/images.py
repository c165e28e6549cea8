"""Runner images for the Podman runtime, built on this machine with no registry.

The built-in images are deliberately almost empty: busybox-static (for ``/bin/sh``
and a few tools), ``/etc/passwd``, and the mount points the runtime uses. The
interpreter is not copied in: at run time the Podman runtime bind-mounts the
host's own Python install tree (or ``node`` binary) and the library directories
it links against, read-only, at the same paths. So an image builds in well under
a second from a 2 MB tarball (``podman import``), never goes stale when the host
interpreter is upgraded, and runs sequences on exactly the interpreter the
subprocess runtime would use. A user's own image (``--runner-image-py`` /
``--runner-image-node``) must bring ``python3`` or ``node`` on its PATH instead.

``sth images build [--force]`` builds both; ``sth images check`` says what is there.
The hub builds a missing built-in image on first use of the Podman runtime.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import tarfile
import time
from typing import Final

from .errors import ImageError as ImageError

#: Bump when the image layout changes: the tag names the recipe.
RECIPE: Final = "1"
PY_IMAGE: Final = f"localhost/spacehub-runner-py:{RECIPE}"
NODE_IMAGE: Final = f"localhost/spacehub-runner-node:{RECIPE}"
#: Label set on the built-in images; the runtime mounts the host interpreter only into these.
HOST_INTERPRETER_LABEL: Final = "spacehub.host-interpreter"
#: busybox applets linked in /bin (the rest stay reachable as ``busybox NAME``).
APPLETS: Final = ("sh", "cat", "echo", "env", "id", "ls", "nc", "sleep", "true", "false", "dd", "head", "ps")
#: Seconds any one podman command may take here before it counts as broken.
PODMAN_TIMEOUT: Final = 60.0


def _busybox() -> str:
    path = shutil.which("busybox") or ("/bin/busybox" if os.path.exists("/bin/busybox") else None)
    if path is None:
        raise ImageError("busybox is needed to build the runner images: apt-get install busybox-static")
    return path


def rootfs_tar() -> bytes:
    """The image's whole root filesystem, as an uncompressed tarball."""
    buffer = io.BytesIO()
    now = int(time.time())

    def add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, now
        tar.addfile(info)

    def add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, now
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("bin", "etc", "dev", "proc", "sys", "run", "package", "runner", "opt", "opt/spacehub"):
            add_dir(tar, name)
        add_dir(tar, "tmp", 0o1777)
        with open(_busybox(), "rb") as file:
            add_file(tar, "bin/busybox", file.read(), 0o755)
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "busybox", now
            tar.addfile(link)
        add_file(
            tar, "etc/passwd", b"root:x:0:0:root:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/tmp:/bin/sh\n"
        )
        add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return buffer.getvalue()


def _podman(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            ["podman", *args], input=data, capture_output=True, timeout=PODMAN_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise ImageError("podman is not installed (apt-get install podman)") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"podman {args[0]} took more than {PODMAN_TIMEOUT:g} s") from None


def image_exists(name: str) -> bool:
    return _podman("image", "exists", name).returncode == 0


def build_image(name: str, language: str) -> None:
    """(Re)build one built-in runner image from :func:`rootfs_tar`."""
    result = _podman(
        "import",
        "--change",
        f"LABEL {HOST_INTERPRETER_LABEL}=1",
        "--change",
        f"LABEL spacehub.runner={language}",
        "--change",
        'CMD ["/bin/sh"]',
        "--message",
        f"spacehub {language} runner image, recipe {RECIPE}",
        "-",
        name,
        data=rootfs_tar(),
    )
    if result.returncode != 0:
        raise ImageError(f"podman import {name} failed: {result.stderr.decode(errors='replace').strip()}")


def ensure_builtin_images(*, force: bool = False) -> list[str]:
    """Build whichever built-in image is missing (all with ``force``); the names built."""
    built = []
    for name, language in ((PY_IMAGE, "py"), (NODE_IMAGE, "node")):
        if force or not image_exists(name):
            build_image(name, language)
            built.append(name)
    return built


def main(argv: list[str]) -> int:
    """``sth images build|check``."""
    parser = argparse.ArgumentParser(
        prog="sth images", description="Podman runner images (no registry needed)."
    )
    parser.add_argument("action", choices=("build", "check"))
    parser.add_argument("--force", action="store_true", help="rebuild even if the images exist")
    args = parser.parse_args(argv)
    try:
        if args.action == "build":
            started = time.monotonic()
            built = ensure_builtin_images(force=args.force)
            for name in (PY_IMAGE, NODE_IMAGE):
                state = "built" if name in built else "present"
                print(f"{name}: {state}")
            print(f"done in {time.monotonic() - started:.2f} s")
            return 0
        missing = [name for name in (PY_IMAGE, NODE_IMAGE) if not image_exists(name)]
        for name in (PY_IMAGE, NODE_IMAGE):
            print(f"{name}: {'missing' if name in missing else 'present'}")
        return 1 if missing else 0
    except ImageError as exc:
        print(f"sth images: {exc}")
        return 1

"""Differential test: a real mount against a plain copy of its lower, op for op.

A hypothesis state machine runs the same namespace and data operations on a cowfs mount over
a populated lower and on `shutil.copytree(lower, symlinks=True)` on the host filesystem. Each
operation's result or errno must match, and after every step the two whole trees must match:
names, file contents, modes, sizes, st_nlink of files and directories, symlink targets, and
mtimes wherever nothing has changed them since the copy or since the test set them. Inode
numbers must map one to one (hard links share one, renames and copy-ups keep it). Now and
then the overlay is unmounted and mounted again on the same upper dir, which must show the
same tree. At the end the lower must be byte- and metadata-identical to before.

Profile: COWFS_DIFF_PROFILE=thorough runs many more and longer examples than CI's default.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import fingerprint, force_unmount, populate, statx_fresh
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cowfs.overlay.upper import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

settings.register_profile(
    "cowfs-diff-ci", max_examples=12, stateful_step_count=40, deadline=None,
    derandomize=True, database=None, suppress_health_check=list(HealthCheck))
settings.register_profile(
    "cowfs-diff-thorough", max_examples=300, stateful_step_count=120, deadline=None,
    suppress_health_check=list(HealthCheck))
PROFILE = f"cowfs-diff-{os.environ.get('COWFS_DIFF_PROFILE', 'ci')}"

# Names the operations draw from, besides paths that exist: the populated lower's names
# (so ops hit lower, copied-up and whited-out entries) and a few fresh ones.
POOL = ["top.txt", "tool.sh", "pkg", "pkg/main.py", "pkg/__init__.py", "pkg/link", "pkg/sub",
        "pkg/empty", "pkg/sub/data.bin", "a", "b", "pkg/a", "pkg/sub/b", "a/b", "pkg/empty/c"]
# Relative and never through "..": a symlink must not lead out of the tree under test.
LINK_TARGETS = ["main.py", "top.txt", "sub", "missing", "a/b", ".", "sub/data.bin"]
FILE_MODES = [0o644, 0o600, 0o755, 0o444, 0o4755]
DIR_MODES = [0o755, 0o700, 0o2775, 0o1777, 0o555]
MTIMES = [10**9, 1_500_000_000_123_456_789, 2_000_000_000 * 10**9]
OFFSETS = [0, 3, 100, 4095, 20000]
SIZES = [0, 1, 7, 5000, 70000]
MAX_HELD = 3
XATTRS = ["user.a", "user.origin", "trusted.t"]

Outcome = tuple[str, Any]


def outcome(fn: Callable[[Path], Any], root: Path) -> Outcome:
    try:
        return ("ok", fn(root))
    except OSError as exc:
        return ("err", exc.errno)


def xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    """Extended attributes, minus overlay markers the plain reference copied from a layer
    (the mount must never show those: checked by test_mount_semantics)."""
    if path.is_symlink():
        return ()
    return tuple(sorted((n, os.getxattr(path, n)) for n in os.listxattr(path)
                        if not n.startswith(("user.overlay.", "trusted.overlay."))))


def is_fifo(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


CAN_DROP_CACHES = os.access("/proc/sys/vm/drop_caches", os.W_OK)


class OverlayVsPlain(RuleBasedStateMachine):
    """One example: a fresh mount (fresh upper) and a fresh plain copy of the lower."""

    make_mount: Callable[..., Any]
    layers: list[Path]  # lower layers, top first
    base: Path
    counter = 0

    def __init__(self) -> None:
        super().__init__()
        OverlayVsPlain.counter += 1
        name = f"ex{OverlayVsPlain.counter}"
        self.ref = self.base / f"ref-{name}"
        merge_layers(self.layers, self.ref)
        self.om = self.make_mount(*self.layers, name=name)
        self.mnt = Path(self.om.mnt)
        self.held: list[tuple[int, int]] = []  # (overlay fd, plain fd) pairs
        # plain inode -> mtime that no operation since has changed: at first every entry's
        # (copies keep the lower's), then the ones utime sets. Copy-ups must not show here.
        self.pinned: dict[int, int] = {}
        for rel in self.existing():
            s = (self.ref / rel).lstat()
            self.pinned[s.st_ino] = s.st_mtime_ns
        self.ino_map: dict[int, int] = {}  # plain inode -> overlay inode
        self.steps_since_remount = 0
        self.steps_since_forget = 0

    def teardown(self) -> None:
        self._close_held()
        force_unmount(str(self.mnt))
        shutil.rmtree(self.ref, ignore_errors=True)
        shutil.rmtree(self.om.upper, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------

    def existing(self) -> list[str]:
        out = []
        for dirpath, dirs, files in os.walk(self.ref):
            for n in dirs + files:
                out.append(str((Path(dirpath) / n).relative_to(self.ref)))
        return sorted(out)

    def pick(self, data: st.DataObject, label: str) -> str:
        existing = self.existing()
        if existing and data.draw(st.booleans(), label=f"{label} exists"):
            return data.draw(st.sampled_from(existing), label=label)
        return data.draw(st.sampled_from(POOL), label=label)

    def both(self, what: str, fn: Callable[[Path], Any]) -> Outcome:
        self.steps_since_remount += 1
        self.steps_since_forget += 1
        ref = outcome(fn, self.ref)
        got = outcome(fn, self.mnt)
        assert got == ref, f"{what}: overlay gave {got}, plain gave {ref}"
        return ref

    def ref_ino(self, rel: str, follow: bool = False) -> int | None:
        try:
            return os.stat(self.ref / rel, follow_symlinks=follow).st_ino
        except OSError:
            return None

    def unpin(self, *inos: int | None) -> None:
        for ino in inos:
            self.pinned.pop(ino, None)  # type: ignore[arg-type]

    def parent_ino(self, rel: str) -> int | None:
        # The directory an operation changes is the resolved parent: `link/x` with `link -> .`
        # changes the mtime of the directory the link points to, not the link's.
        return self.ref_ino(str(Path(rel).parent), follow=True)

    def _close_held(self) -> None:
        for a, b in self.held:
            os.close(a)
            os.close(b)
        self.held.clear()

    # -- namespace operations ---------------------------------------------------------------

    @rule(data=st.data(), mode=st.sampled_from(FILE_MODES))
    def create(self, data: st.DataObject, mode: int) -> None:
        p = self.pick(data, "path")
        parent = self.parent_ino(p)

        def op(root: Path) -> None:
            os.close(os.open(root / p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))

        if self.both(f"create {p}", op)[0] == "ok":
            self.unpin(parent)

    @rule(data=st.data(), mode=st.sampled_from(DIR_MODES))
    def mkdir(self, data: st.DataObject, mode: int) -> None:
        p = self.pick(data, "path")
        parent = self.parent_ino(p)
        if self.both(f"mkdir {p}", lambda root: os.mkdir(root / p, mode))[0] == "ok":
            self.unpin(parent)

    @rule(data=st.data())
    def mkfifo(self, data: st.DataObject) -> None:
        p = self.pick(data, "path")
        parent = self.parent_ino(p)
        if self.both(f"mkfifo {p}", lambda root: os.mkfifo(root / p, 0o640))[0] == "ok":
            self.unpin(parent)

    @rule(data=st.data(), dest=st.sampled_from(LINK_TARGETS))
    def symlink(self, data: st.DataObject, dest: str) -> None:
        p = self.pick(data, "path")
        parent = self.parent_ino(p)
        if self.both(f"symlink {p} -> {dest}",
                     lambda root: os.symlink(dest, root / p))[0] == "ok":
            self.unpin(parent)

    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        src, dst = self.pick(data, "src"), self.pick(data, "dst")
        parent = self.parent_ino(dst)
        if self.both(f"link {src} {dst}", lambda root: os.link(
                root / src, root / dst, follow_symlinks=False))[0] == "ok":
            self.unpin(parent)

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        p = self.pick(data, "path")
        parent = self.parent_ino(p)
        if self.both(f"unlink {p}", lambda root: os.unlink(root / p))[0] == "ok":
            self.unpin(parent)

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        p = self.pick(data, "path")
        parent = self.parent_ino(p)
        if self.both(f"rmdir {p}", lambda root: os.rmdir(root / p))[0] == "ok":
            self.unpin(parent)

    @rule(data=st.data(), flags=st.sampled_from([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, data: st.DataObject, flags: int) -> None:
        src, dst = self.pick(data, "src"), self.pick(data, "dst")
        parents = (self.parent_ino(src), self.parent_ino(dst))

        def op(root: Path) -> None:
            if flags:
                renameat2(str(root / src), str(root / dst), flags)
            else:
                os.rename(root / src, root / dst)

        if self.both(f"rename {src} {dst} flags={flags}", op)[0] == "ok":
            self.unpin(*parents)

    # -- data and attribute operations ------------------------------------------------------

    @rule(data=st.data(), offset=st.sampled_from(OFFSETS), payload=st.binary(max_size=48))
    def write(self, data: st.DataObject, offset: int, payload: bytes) -> None:
        p = self.pick(data, "path")
        if is_fifo(self.ref / p):
            return
        ino = self.ref_ino(p, follow=True)

        def op(root: Path) -> int:
            fd = os.open(root / p, os.O_WRONLY)
            try:
                return os.pwrite(fd, payload, offset)
            finally:
                os.close(fd)

        if self.both(f"write {p} @{offset} {len(payload)}B", op)[0] == "ok":
            self.unpin(ino)

    @rule(data=st.data(), payload=st.binary(max_size=48))
    def overwrite(self, data: st.DataObject, payload: bytes) -> None:
        """Like the shell's `>`: O_CREAT|O_TRUNC, follows symlinks."""
        p = self.pick(data, "path")
        if is_fifo(self.ref / p):
            return
        ino, parent = self.ref_ino(p, follow=True), self.parent_ino(p)
        try:  # through a dangling symlink O_CREAT makes the target: its directory changes
            target_parent: int | None = os.stat(os.path.dirname(os.path.realpath(
                self.ref / p))).st_ino
        except OSError:
            target_parent = None

        def op(root: Path) -> int:
            fd = os.open(root / p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                return os.write(fd, payload)
            finally:
                os.close(fd)

        if self.both(f"overwrite {p} {len(payload)}B", op)[0] == "ok":
            self.unpin(ino, parent, target_parent)

    @rule(data=st.data(), payload=st.binary(min_size=1, max_size=48))
    def append(self, data: st.DataObject, payload: bytes) -> None:
        """O_APPEND: the kernel picks the offset from the size it has cached."""
        p = self.pick(data, "path")
        if is_fifo(self.ref / p):
            return
        ino = self.ref_ino(p, follow=True)

        def op(root: Path) -> int:
            fd = os.open(root / p, os.O_WRONLY | os.O_APPEND)
            try:
                return os.write(fd, payload)
            finally:
                os.close(fd)

        if self.both(f"append {p} {len(payload)}B", op)[0] == "ok":
            self.unpin(ino)

    @rule(data=st.data(), name=st.sampled_from(XATTRS), value=st.binary(max_size=16),
          remove=st.booleans())
    def xattr(self, data: st.DataObject, name: str, value: bytes, remove: bool) -> None:
        p = self.pick(data, "path")
        if remove:
            self.both(f"removexattr {p} {name}", lambda root: os.removexattr(
                root / p, name, follow_symlinks=False))
        else:
            self.both(f"setxattr {p} {name}", lambda root: os.setxattr(
                root / p, name, value, follow_symlinks=False))

    @rule(data=st.data(), size=st.sampled_from(SIZES))
    def truncate(self, data: st.DataObject, size: int) -> None:
        p = self.pick(data, "path")
        if is_fifo(self.ref / p):
            return
        ino = self.ref_ino(p, follow=True)
        if self.both(f"truncate {p} {size}", lambda root: os.truncate(root / p, size))[0] \
                == "ok":
            self.unpin(ino)

    @rule(data=st.data(), mode=st.sampled_from(FILE_MODES + DIR_MODES))
    def chmod(self, data: st.DataObject, mode: int) -> None:
        p = self.pick(data, "path")
        self.both(f"chmod {p} {mode:o}", lambda root: os.chmod(root / p, mode))

    @rule(data=st.data(), mtime=st.sampled_from(MTIMES))
    def utime(self, data: st.DataObject, mtime: int) -> None:
        p = self.pick(data, "path")
        if self.both(f"utime {p} {mtime}", lambda root: os.utime(
                root / p, ns=(mtime - 7, mtime), follow_symlinks=False))[0] == "ok":
            ino = self.ref_ino(p)
            assert ino is not None
            self.pinned[ino] = mtime

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        p = self.pick(data, "path")
        if not is_fifo(self.ref / p):
            self.both(f"read {p}", lambda root: (root / p).read_bytes())

    # -- file handles that outlive namespace changes ----------------------------------------

    @precondition(lambda self: len(self.held) < MAX_HELD)
    @rule(data=st.data(), writable=st.booleans())
    def hold(self, data: st.DataObject, writable: bool) -> None:
        p = self.pick(data, "path")
        if is_fifo(self.ref / p):
            return
        if not writable and os.environ.get("COWFS_PASSTHROUGH") == "1" \
                and (self.mnt / p).is_file() and not os.path.lexists(self.om.upper / p):
            # Passthrough: writers of a store file held read-only get ETXTBSY (README,
            # Limitations; tests/test_passthrough.py), which a plain directory cannot mirror.
            writable = True
        flags = os.O_RDWR if writable else os.O_RDONLY
        ref = outcome(lambda root: os.open(root / p, flags), self.ref)
        got = outcome(lambda root: os.open(root / p, flags), self.mnt)
        if got[0] == "ok" and ref[0] == "ok":
            self.held.append((got[1], ref[1]))
            return
        for r in (got, ref):
            if r[0] == "ok":
                os.close(r[1])
        assert got == ref, f"open {p} flags={flags}: overlay gave {got}, plain gave {ref}"

    @precondition(lambda self: self.held)
    @rule(data=st.data(), offset=st.sampled_from(OFFSETS), payload=st.binary(max_size=32))
    def use_held(self, data: st.DataObject, offset: int, payload: bytes) -> None:
        """Read through a held fd (it must see writes made since), or write through it."""
        a, b = self.held[data.draw(st.integers(0, len(self.held) - 1), label="fd")]
        if payload:
            ino = os.fstat(b).st_ino
            if self.both("pwrite held", lambda root: os.pwrite(
                    a if root == self.mnt else b, payload, offset))[0] == "ok":
                self.unpin(ino)
        self.both("pread held", lambda root: os.pread(a if root == self.mnt else b, 1 << 17, 0))
        fa, fb = os.fstat(a), os.fstat(b)
        assert (fa.st_nlink, fa.st_mode) == (fb.st_nlink, fb.st_mode)
        if stat.S_ISREG(fb.st_mode):
            assert fa.st_size == fb.st_size

    @precondition(lambda self: self.held)
    @rule()
    def release(self) -> None:
        a, b = self.held.pop(0)
        os.close(a)
        os.close(b)

    @precondition(lambda self: self.steps_since_remount >= 12)
    @rule()
    def remount(self) -> None:
        """Unmount and mount the same upper again: nothing may live only in daemon memory."""
        self._close_held()
        force_unmount(str(self.mnt))
        self.om = self.make_mount(*self.layers, name=self.om.mnt.parent.name[3:])
        self.ino_map.clear()  # inode numbers are stable for a mount's life only
        self.steps_since_remount = 0

    @precondition(lambda self: CAN_DROP_CACHES and self.steps_since_forget >= 4)
    @rule()
    def forget_kernel_caches(self) -> None:
        """The kernel drops its pages, dentries and inodes (FORGETs): the next walk lists,
        looks up and reads again, which the C reader answers for what the daemon published
        (cowfs/fuse/fastlookup.py) while the daemon answers the rest."""
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        self.steps_since_forget = 0

    # -- the whole-tree comparison ----------------------------------------------------------

    def snapshot(self, root: Path) -> tuple[dict[str, tuple[Any, ...]], dict[str, int]]:
        tree: dict[str, tuple[Any, ...]] = {}
        inos: dict[str, int] = {}
        for dirpath, dirs, files in os.walk(root):
            for name in ["", *dirs, *files]:
                full = Path(dirpath) / name if name else Path(dirpath)
                rel = str(full.relative_to(root))
                s = full.lstat()
                row: tuple[Any, ...] = (stat.filemode(s.st_mode), s.st_nlink, xattrs(full))
                if stat.S_ISREG(s.st_mode):
                    row += (s.st_size, full.read_bytes())
                elif stat.S_ISLNK(s.st_mode):
                    row += (s.st_size, os.readlink(full))
                tree[rel] = row
                inos[rel] = s.st_ino
        return dict(sorted(tree.items())), inos

    @invariant()
    def trees_match(self) -> None:
        ref_tree, ref_inos = self.snapshot(self.ref)
        got_tree, got_inos = self.snapshot(self.mnt)
        assert got_tree == ref_tree
        # What the kernel cached must be what the daemon says now (nothing stale, nothing
        # wrong that only a cache hides): ask the daemon directly for every entry.
        for rel, (_, nlink, _, *rest) in got_tree.items():
            fresh = statx_fresh(self.mnt / rel)
            assert (stat.filemode(fresh.mode), fresh.nlink, fresh.ino) == \
                (got_tree[rel][0], nlink, got_inos[rel]), f"daemon vs kernel cache: {rel}"
            if rest:
                assert fresh.size == rest[0], f"daemon vs kernel cache: size of {rel}"
        live = set(ref_inos.values()) | {os.fstat(b).st_ino for _, b in self.held}
        # The host reuses freed inode numbers: forget what we knew about dead ones.
        self.ino_map = {k: v for k, v in self.ino_map.items() if k in live}
        self.pinned = {k: v for k, v in self.pinned.items() if k in live}
        reverse = {v: k for k, v in self.ino_map.items()}
        for rel, ino in ref_inos.items():
            if rel == ".":
                continue  # the mount point's number is not the overlay's business
            got = got_inos[rel]
            assert self.ino_map.setdefault(ino, got) == got, f"inode of {rel} changed"
            assert reverse.setdefault(got, ino) == ino, f"{rel} shares an inode wrongly"
        for rel, ino in ref_inos.items():
            if ino in self.pinned and rel != ".":
                mt = (self.ref / rel).lstat().st_mtime_ns
                assert mt == self.pinned[ino], f"plain copy changed the mtime of {rel}?"
                assert (self.mnt / rel).lstat().st_mtime_ns == mt, f"mtime of {rel}"
                assert statx_fresh(self.mnt / rel).mtime_ns == mt, f"daemon's mtime of {rel}"


def is_marker(path: str) -> tuple[bool, bool]:
    """(whiteout, opaque dir) in the kernel's formats, judged without cowfs code."""
    st = os.lstat(path)
    names = os.listxattr(path, follow_symlinks=False)
    whiteout = (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0) or (
        stat.S_ISREG(st.st_mode) and st.st_size == 0 and "user.overlay.whiteout" in names)
    opaque = stat.S_ISDIR(st.st_mode) and "user.overlay.opaque" in names and \
        os.getxattr(path, "user.overlay.opaque") == b"y"
    return whiteout, opaque


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _copy_entry(src: str, dst: Path) -> None:
    if os.path.isdir(src) and not os.path.islink(src):
        dst.mkdir()
        for de in os.scandir(src):
            if not is_marker(de.path)[0]:
                _copy_entry(de.path, dst / de.name)
        shutil.copystat(src, dst)
    else:
        shutil.copy2(src, dst, follow_symlinks=False)


def _apply_layer(src: str, dst: Path) -> None:
    for de in os.scandir(src):
        target = dst / de.name
        whiteout, opaque = is_marker(de.path)
        if whiteout:
            _remove(target)
        elif de.is_dir(follow_symlinks=False) and target.is_dir() and \
                not target.is_symlink() and not opaque:
            _apply_layer(de.path, target)
        else:
            _remove(target)
            _copy_entry(de.path, target)
    shutil.copystat(src, dst)  # a merged directory shows its top layer's attributes


def merge_layers(layers: list[Path], dest: Path) -> None:
    """The reference: what `mount -t overlay -o lowerdir=A:B` shows, built as a plain tree."""
    shutil.copytree(layers[-1], dest, symlinks=True)
    for layer in reversed(layers[:-1]):
        _apply_layer(str(layer), dest)


def run_machine(tmp_path: Path, overlay_mount: Any, layers: list[Path],
                examples: int) -> None:
    before = [fingerprint(layer) for layer in layers]
    OverlayVsPlain.make_mount = staticmethod(overlay_mount)  # type: ignore[assignment]
    OverlayVsPlain.layers = layers
    OverlayVsPlain.base = tmp_path
    OverlayVsPlain.counter = 0
    profile = settings.get_profile(PROFILE)
    run_state_machine_as_test(OverlayVsPlain, settings=settings(profile, max_examples=examples))
    assert [fingerprint(layer) for layer in layers] == before, "a lower layer was modified"
    assert OverlayVsPlain.counter > 0


def bottom_layer(root: Path) -> Path:
    root.mkdir()
    populate(root)
    (root / "pkg" / "sub" / "deep").mkdir()
    (root / "pkg" / "sub" / "deep" / "x.txt").write_text("deep\n")
    os.setxattr(root / "top.txt", "user.origin", b"lower")
    os.setxattr(root / "pkg" / "sub", "user.origin", b"lower dir")
    os.setxattr(root / "pkg" / "main.py", "trusted.t", b"root only")
    os.utime(root / "pkg", ns=(10**18, 10**18))  # distinct times, so copy-ups show
    return root


@pytest.mark.parametrize("opens", ["passthrough", "kernel"])
def test_overlay_behaves_like_a_plain_directory(tmp_path: Path, overlay_mount: Any, opens: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # (Kernel opens: a read-only fd held on a lower file follows its copy-up.)
    monkeypatch.setenv("COWFS_PASSTHROUGH", "0" if opens == "kernel" else "1")
    layers = [bottom_layer(tmp_path / "lower")]
    run_machine(tmp_path, overlay_mount, layers, settings.get_profile(PROFILE).max_examples)


def test_deep_path_profile_daemon_through_dir_handles(tmp_path: Path, overlay_mount: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon reaches every entry through directory handles, as it does for paths
    longer than PATH_MAX (cowfs.dirfd; COWFS_DIRFD_FROM=0): its renames, whiteouts,
    exchanges and copy-ups must keep its handle cache right for every step to match."""
    monkeypatch.setenv("COWFS_DIRFD_FROM", "0")  # inherited by the mount daemons
    layers = [bottom_layer(tmp_path / "lower")]
    run_machine(tmp_path, overlay_mount, layers, settings.get_profile(PROFILE).max_examples)


def test_two_lower_layers_behave_like_their_merge(tmp_path: Path, device_dir: Path,
                                                  overlay_mount: Any) -> None:
    """Whiteouts (both formats), an opaque dir, a dir over a file and a file over a dir in
    the top lower layer: every operation must also see through them correctly."""
    bottom = bottom_layer(tmp_path / "bottom")
    top = device_dir / "top"  # it holds a 0/0 device whiteout
    (top / "pkg" / "sub").mkdir(parents=True)
    (top / "pkg" / "main.py").touch()
    os.setxattr(top / "pkg" / "main.py", "user.overlay.whiteout", b"y")
    os.mknod(top / "pkg" / "empty", stat.S_IFCHR | 0o600, 0)
    os.setxattr(top / "pkg" / "sub", "user.overlay.opaque", b"y")
    (top / "pkg" / "sub" / "only.txt").write_text("top layer\n")
    (top / "pkg" / "new.py").write_text("new = True\n")
    (top / "top.txt").write_text("top layer wins\n")
    (top / "tool.sh" / "inner").mkdir(parents=True)  # a directory above a file
    (top / "pkg" / "link").mkdir()
    (top / "extra").mkdir()
    (top / "extra" / "f.txt").write_text("f\n")
    os.utime(top / "pkg", ns=(2 * 10**18, 2 * 10**18))
    layers = [top, bottom]
    examples = max(1, settings.get_profile(PROFILE).max_examples * 2 // 3)
    run_machine(tmp_path, overlay_mount, layers, examples)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])

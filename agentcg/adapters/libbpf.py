"""A thin ctypes layer over the system libbpf (libbpf.so.1).

Only what agentcg needs: open an object file, switch programs off, set
``const volatile`` knobs in ``.rodata``, load, attach (tracing, cgroup,
struct_ops), ring buffers, map access by fd, and BTF lookups. Every libbpf
failure becomes a :class:`LibbpfError` that carries the errno and the last
lines libbpf logged (the verifier's complaint, usually).

Works with libbpf >= 1.0 (Debian bookworm ships 1.1.2). libbpf 1.x returns
NULL and sets errno on failure; older "error pointer" returns are not handled.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import threading
from collections import deque
from typing import Callable, Iterator

# enum bpf_prog_type (uapi/linux/bpf.h)
BPF_PROG_TYPE_CGROUP_SKB = 8
BPF_PROG_TYPE_CGROUP_SOCK = 9
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_PROG_TYPE_TRACING = 26
BPF_PROG_TYPE_STRUCT_OPS = 27
# enum bpf_map_type
BPF_MAP_TYPE_RINGBUF = 27
# map flags / attach types
BPF_F_LINK = 1 << 13
BPF_STRUCT_OPS = 44
# program load flags
BPF_F_SLEEPABLE = 1 << 4
# BTF kinds
BTF_KIND_STRUCT = 4
BTF_KIND_DATASEC = 15
# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
# libbpf_print_level
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2


class LibbpfError(OSError):
    """A libbpf call failed. ``errno`` is set; ``log`` holds libbpf's last lines."""

    def __init__(self, err: int, what: str, log: list[str] | None = None):
        self.log = list(log or [])
        msg = f"{what}: {os.strerror(err)} (errno {err})"
        if self.log:
            msg += "\nlibbpf: " + "\nlibbpf: ".join(line.rstrip() for line in self.log[-12:])
        super().__init__(err, msg)

    def __str__(self) -> str:  # OSError's default drops the log
        return self.args[1]


class LibbpfUnavailable(RuntimeError):
    """libbpf.so.1 cannot be loaded on this machine."""


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32), ("size", ctypes.c_uint32)]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
RINGBUF_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

_P = ctypes.c_void_p
_SIGS: dict[str, tuple[object, list]] = {
    "libbpf_major_version": (ctypes.c_uint32, []),
    "libbpf_minor_version": (ctypes.c_uint32, []),
    "libbpf_set_print": (_P, [_PRINT_FN]),
    "libbpf_num_possible_cpus": (ctypes.c_int, []),
    "libbpf_probe_bpf_prog_type": (ctypes.c_int, [ctypes.c_int, _P]),
    "libbpf_probe_bpf_map_type": (ctypes.c_int, [ctypes.c_int, _P]),
    "bpf_object__open_file": (_P, [ctypes.c_char_p, _P]),
    "bpf_object__load": (ctypes.c_int, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__btf": (_P, [_P]),
    "bpf_object__find_program_by_name": (_P, [_P, ctypes.c_char_p]),
    "bpf_object__find_map_by_name": (_P, [_P, ctypes.c_char_p]),
    "bpf_object__next_program": (_P, [_P, _P]),
    "bpf_object__next_map": (_P, [_P, _P]),
    "bpf_program__name": (ctypes.c_char_p, [_P]),
    "bpf_program__section_name": (ctypes.c_char_p, [_P]),
    "bpf_program__set_autoload": (ctypes.c_int, [_P, ctypes.c_bool]),
    "bpf_program__autoload": (ctypes.c_bool, [_P]),
    "bpf_program__flags": (ctypes.c_uint32, [_P]),
    "bpf_program__set_flags": (ctypes.c_int, [_P, ctypes.c_uint32]),
    "bpf_program__fd": (ctypes.c_int, [_P]),
    "bpf_program__attach": (_P, [_P]),
    "bpf_program__attach_cgroup": (_P, [_P, ctypes.c_int]),
    "bpf_map__name": (ctypes.c_char_p, [_P]),
    "bpf_map__fd": (ctypes.c_int, [_P]),
    "bpf_map__initial_value": (_P, [_P, ctypes.POINTER(ctypes.c_size_t)]),
    "bpf_map__set_autocreate": (ctypes.c_int, [_P, ctypes.c_bool]),
    "bpf_map__attach_struct_ops": (_P, [_P]),
    "bpf_map__value_size": (ctypes.c_uint32, [_P]),
    "bpf_map__key_size": (ctypes.c_uint32, [_P]),
    "bpf_link__destroy": (ctypes.c_int, [_P]),
    "bpf_link_create": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int, _P]),
    "bpf_map__map_flags": (ctypes.c_uint32, [_P]),
    "bpf_map__set_map_flags": (ctypes.c_int, [_P, ctypes.c_uint32]),
    "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, _P, _P]),
    "bpf_map_update_elem": (ctypes.c_int, [ctypes.c_int, _P, _P, ctypes.c_uint64]),
    "bpf_map_delete_elem": (ctypes.c_int, [ctypes.c_int, _P]),
    "bpf_map_get_next_key": (ctypes.c_int, [ctypes.c_int, _P, _P]),
    "ring_buffer__new": (_P, [ctypes.c_int, RINGBUF_SAMPLE_FN, _P, _P]),
    "ring_buffer__poll": (ctypes.c_int, [_P, ctypes.c_int]),
    "ring_buffer__consume": (ctypes.c_int, [_P]),
    "ring_buffer__epoll_fd": (ctypes.c_int, [_P]),
    "ring_buffer__free": (None, [_P]),
    "btf__load_vmlinux_btf": (_P, []),
    "btf__free": (None, [_P]),
    "btf__find_by_name_kind": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_uint32]),
    "btf__type_by_id": (ctypes.POINTER(_BtfType), [_P, ctypes.c_uint32]),
    "btf__name_by_offset": (ctypes.c_char_p, [_P, ctypes.c_uint32]),
}


class Libbpf:
    """The loaded library. One per process (libbpf's print callback is global)."""

    _instance: "Libbpf | None" = None
    _lock = threading.Lock()

    def __init__(self, path: str | None = None):
        name = path or os.environ.get("AGENTCG_LIBBPF") or "libbpf.so.1"
        try:
            self.lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise LibbpfUnavailable(f"cannot load {name}: {exc}") from exc
        for fn, (restype, argtypes) in _SIGS.items():
            try:
                f = getattr(self.lib, fn)
            except AttributeError:
                continue  # optional in older versions: callers check has()
            f.restype = restype
            f.argtypes = argtypes
        self.version = (int(self.lib.libbpf_major_version()), int(self.lib.libbpf_minor_version()))
        self._log: deque[str] = deque(maxlen=200)
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
        self._libc.vsnprintf.restype = ctypes.c_int
        self._buf = ctypes.create_string_buffer(4096)
        self._print_cb = _PRINT_FN(self._on_print)  # kept alive: libbpf holds the pointer
        self.lib.libbpf_set_print(self._print_cb)

    @classmethod
    def get(cls) -> "Libbpf":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def has(self, fn: str) -> bool:
        return hasattr(self.lib, fn)

    @property
    def version_str(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    # -- logging ----------------------------------------------------------
    def _on_print(self, level: int, fmt: bytes, va_list: int) -> int:
        # va_list on x86-64/arm64 is passed by pointer: vsnprintf formats it for us.
        try:
            n = self._libc.vsnprintf(self._buf, len(self._buf), fmt, va_list)
            if n > 0 and level <= LIBBPF_INFO:
                self._log.append(self._buf.value.decode(errors="replace"))
        except Exception:  # never raise into C
            pass
        return 0

    def log_mark(self) -> int:
        return len(self._log)

    def log_since(self, mark: int) -> list[str]:
        lines = list(self._log)
        return lines[mark:] if mark <= len(lines) else lines

    def drain_log(self) -> list[str]:
        lines = list(self._log)
        self._log.clear()
        return lines

    # -- error helpers ------------------------------------------------------
    def check_ptr(self, ptr: int | None, what: str) -> int:
        if not ptr:
            err = ctypes.get_errno() or _errno.EINVAL
            raise LibbpfError(err, what, self.drain_log())
        return ptr

    def check_rc(self, rc: int, what: str) -> int:
        if rc < 0:
            err = -rc if rc != -1 else (ctypes.get_errno() or _errno.EINVAL)
            raise LibbpfError(err, what, self.drain_log())
        return rc

    # -- probes -------------------------------------------------------------
    def probe_prog_type(self, prog_type: int) -> bool:
        return self.lib.libbpf_probe_bpf_prog_type(prog_type, None) == 1

    def probe_map_type(self, map_type: int) -> bool:
        return self.lib.libbpf_probe_bpf_map_type(map_type, None) == 1

    def num_possible_cpus(self) -> int:
        return self.check_rc(self.lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


class VmlinuxBtf:
    """The running kernel's BTF, for "does this kernel have type X" questions."""

    def __init__(self, lb: Libbpf):
        self._lb = lb
        self._btf = lb.check_ptr(lb.lib.btf__load_vmlinux_btf(), "btf__load_vmlinux_btf")

    def has_struct(self, name: str) -> bool:
        return self._lb.lib.btf__find_by_name_kind(self._btf, name.encode(), BTF_KIND_STRUCT) > 0

    def close(self) -> None:
        if self._btf:
            self._lb.lib.btf__free(self._btf)
            self._btf = None

    def __enter__(self) -> "VmlinuxBtf":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Link:
    """An attachment; destroy() detaches."""

    def __init__(self, lb: Libbpf, ptr: int, what: str):
        self._lb, self._ptr, self.what = lb, ptr, what

    def destroy(self) -> None:
        if self._ptr:
            self._lb.lib.bpf_link__destroy(self._ptr)
            self._ptr = None

    @property
    def alive(self) -> bool:
        return bool(self._ptr)


class FdLink:
    """A kernel BPF link held by its fd; destroy() closes it (detaches)."""

    def __init__(self, fd: int, what: str, holder: "Link | None" = None):
        self.fd, self.what, self._holder = fd, what, holder

    def destroy(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._holder is not None:
            self._holder.destroy()
            self._holder = None

    @property
    def alive(self) -> bool:
        return self.fd >= 0


class Map:
    def __init__(self, lb: Libbpf, ptr: int):
        self._lb, self.ptr = lb, ptr
        self.name = lb.lib.bpf_map__name(ptr).decode()

    @property
    def fd(self) -> int:
        return self._lb.check_rc(self._lb.lib.bpf_map__fd(self.ptr), f"bpf_map__fd({self.name})")

    @property
    def key_size(self) -> int:
        return int(self._lb.lib.bpf_map__key_size(self.ptr))

    @property
    def value_size(self) -> int:
        return int(self._lb.lib.bpf_map__value_size(self.ptr))

    def lookup(self, key: ctypes._SimpleCData | ctypes.Structure, value) -> bool:
        """Fill `value` (a ctypes object) for `key`; False when absent."""
        rc = self._lb.lib.bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value))
        if rc < 0:
            err = ctypes.get_errno()
            if err == _errno.ENOENT:
                return False
            raise LibbpfError(err, f"lookup in map {self.name}")
        return True

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        rc = self._lb.lib.bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), flags)
        if rc < 0:
            raise LibbpfError(ctypes.get_errno(), f"update of map {self.name}")

    def delete(self, key) -> bool:
        rc = self._lb.lib.bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if rc < 0:
            err = ctypes.get_errno()
            if err == _errno.ENOENT:
                return False
            raise LibbpfError(err, f"delete from map {self.name}")
        return True

    def keys(self, key_type) -> Iterator:
        """Iterate keys (as `key_type` instances); safe against concurrent deletes."""
        fd = self.fd
        cur = None
        nxt = key_type()
        while True:
            rc = self._lb.lib.bpf_map_get_next_key(fd, ctypes.byref(cur) if cur is not None else None, ctypes.byref(nxt))
            if rc < 0:
                err = ctypes.get_errno()
                if err == _errno.ENOENT:
                    return
                raise LibbpfError(err, f"iterating map {self.name}")
            yield nxt
            cur, nxt = nxt, key_type()

    def set_link_flag(self) -> None:
        """Create the struct_ops map with BPF_F_LINK (before load), as .struct_ops.link does in libbpf >= 1.2."""
        flags = int(self._lb.lib.bpf_map__map_flags(self.ptr))
        self._lb.check_rc(self._lb.lib.bpf_map__set_map_flags(self.ptr, flags | BPF_F_LINK),
                          f"set_map_flags({self.name})")

    def attach_struct_ops_link(self) -> "FdLink":
        """Register a BPF_F_LINK struct_ops map through a kernel link: the
        registration ends when the link's fd closes, also when the process dies."""
        holder = self.attach_struct_ops()     # writes the map value (no registration for link maps)
        fd = self._lb.lib.bpf_link_create(self.fd, 0, BPF_STRUCT_OPS, None)
        if fd < 0:
            err = -fd if fd != -1 else (ctypes.get_errno() or _errno.EINVAL)
            holder.destroy()
            raise LibbpfError(err, f"bpf_link_create(struct_ops {self.name})", self._lb.drain_log())
        return FdLink(fd, f"struct_ops {self.name} (link)", holder)

    def attach_struct_ops(self) -> Link:
        ptr = self._lb.check_ptr(self._lb.lib.bpf_map__attach_struct_ops(self.ptr), f"attach struct_ops {self.name}")
        return Link(self._lb, ptr, f"struct_ops {self.name}")


class Program:
    def __init__(self, lb: Libbpf, ptr: int):
        self._lb, self.ptr = lb, ptr
        self.name = lb.lib.bpf_program__name(ptr).decode()
        self.section = (lb.lib.bpf_program__section_name(ptr) or b"").decode()

    def set_autoload(self, on: bool) -> None:
        self._lb.check_rc(self._lb.lib.bpf_program__set_autoload(self.ptr, on), f"set_autoload({self.name})")

    def set_sleepable(self) -> None:
        """Load as sleepable (what SEC("struct_ops.s/...") does in libbpf >= 1.2)."""
        flags = int(self._lb.lib.bpf_program__flags(self.ptr))
        self._lb.check_rc(self._lb.lib.bpf_program__set_flags(self.ptr, flags | BPF_F_SLEEPABLE),
                          f"set_flags({self.name})")

    @property
    def autoload(self) -> bool:
        return bool(self._lb.lib.bpf_program__autoload(self.ptr))

    def attach(self) -> Link:
        mark = self._lb.log_mark()
        ptr = self._lb.lib.bpf_program__attach(self.ptr)
        if not ptr:
            err = ctypes.get_errno() or _errno.EINVAL
            raise LibbpfError(err, f"attach {self.name} ({self.section})", self._lb.log_since(mark))
        return Link(self._lb, ptr, f"{self.section}")

    def attach_cgroup(self, cgroup_fd: int) -> Link:
        mark = self._lb.log_mark()
        ptr = self._lb.lib.bpf_program__attach_cgroup(self.ptr, cgroup_fd)
        if not ptr:
            err = ctypes.get_errno() or _errno.EINVAL
            raise LibbpfError(err, f"attach {self.name} ({self.section}) to cgroup", self._lb.log_since(mark))
        return Link(self._lb, ptr, f"{self.section}")


class BpfObject:
    """An opened (then loaded) BPF object file."""

    def __init__(self, lb: Libbpf, path: str):
        self._lb = lb
        self.path = path
        lb.drain_log()
        self._obj = lb.check_ptr(lb.lib.bpf_object__open_file(path.encode(), None), f"open {path}")
        self.loaded = False

    def programs(self) -> list[Program]:
        out, cur = [], None
        while True:
            cur = self._lb.lib.bpf_object__next_program(self._obj, cur)
            if not cur:
                return out
            out.append(Program(self._lb, cur))

    def maps(self) -> list[Map]:
        out, cur = [], None
        while True:
            cur = self._lb.lib.bpf_object__next_map(self._obj, cur)
            if not cur:
                return out
            out.append(Map(self._lb, cur))

    def program(self, name: str) -> Program:
        ptr = self._lb.lib.bpf_object__find_program_by_name(self._obj, name.encode())
        if not ptr:
            raise KeyError(f"no BPF program named {name!r} in {self.path}")
        return Program(self._lb, ptr)

    def map(self, name: str) -> Map:
        ptr = self._lb.lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not ptr:
            raise KeyError(f"no BPF map named {name!r} in {self.path}")
        return Map(self._lb, ptr)

    def _rodata_layout(self, sec: str = ".rodata") -> tuple[Map, dict[str, tuple[int, int]]]:
        """The map of a global-data section (.rodata, .bss, .data) and
        {variable: (offset, size)} from the object's BTF."""
        rodata = next((m for m in self.maps() if m.name.endswith(sec)), None)
        if rodata is None:
            raise KeyError(f"{self.path} has no {sec} section")
        lib = self._lb.lib
        btf = lib.bpf_object__btf(self._obj)
        if not btf:
            raise KeyError(f"{self.path} has no BTF")
        tid = lib.btf__find_by_name_kind(btf, sec.encode(), BTF_KIND_DATASEC)
        if tid <= 0:
            raise KeyError(f"{self.path}: no {sec} datasec in BTF")
        t = lib.btf__type_by_id(btf, tid)
        vlen = t.contents.info & 0xFFFF
        base = ctypes.addressof(t.contents) + ctypes.sizeof(_BtfType)
        out = {}
        for i in range(vlen):
            si = _BtfVarSecinfo.from_address(base + i * ctypes.sizeof(_BtfVarSecinfo))
            vt = lib.btf__type_by_id(btf, si.type)
            name = lib.btf__name_by_offset(btf, vt.contents.name_off).decode()
            out[name] = (si.offset, si.size)
        return rodata, out

    def set_knobs(self, **values: int) -> None:
        """Set `const volatile` integer knobs before load."""
        if self.loaded:
            raise RuntimeError("knobs must be set before load")
        if not values:
            return
        rodata, layout = self._rodata_layout()
        size = ctypes.c_size_t()
        ptr = self._lb.check_ptr(self._lb.lib.bpf_map__initial_value(rodata.ptr, ctypes.byref(size)),
                                 "bpf_map__initial_value(.rodata)")
        for name, value in values.items():
            if name not in layout:
                raise KeyError(f"knob {name!r} not found in {self.path} (have: {sorted(layout)})")
            off, sz = layout[name]
            if off + sz > size.value or sz not in (1, 2, 4, 8):
                raise ValueError(f"knob {name!r}: bad layout offset={off} size={sz}")
            if value < 0:
                value &= (1 << (8 * sz)) - 1
            if value >= 1 << (8 * sz):
                raise ValueError(f"knob {name!r}={value} does not fit {sz} bytes")
            ctypes.memmove(ptr + off, int(value).to_bytes(sz, "little"), sz)

    def read_global(self, name: str, sec: str = ".bss") -> bytes:
        """Raw bytes of a global variable after load (mmap-able .bss/.data)."""
        m, layout = self._rodata_layout(sec)
        if name not in layout:
            raise KeyError(f"no global {name!r} in {sec} of {self.path}")
        off, sz = layout[name]
        size = ctypes.c_size_t()
        ptr = self._lb.check_ptr(self._lb.lib.bpf_map__initial_value(m.ptr, ctypes.byref(size)),
                                 f"bpf_map__initial_value({sec})")
        return ctypes.string_at(ptr + off, sz)

    def load(self) -> None:
        self._lb.drain_log()
        rc = self._lb.lib.bpf_object__load(self._obj)
        if rc < 0:
            raise LibbpfError(-rc, f"load {os.path.basename(self.path)}", self._lb.drain_log())
        self.loaded = True

    def close(self) -> None:
        if self._obj:
            self._lb.lib.bpf_object__close(self._obj)
            self._obj = None


class RingBuffer:
    """ring_buffer__new over one map; `callback(bytes)` per record."""

    def __init__(self, lb: Libbpf, rb_map: Map, callback: Callable[[bytes], None]):
        self._lb = lb
        self._user_cb = callback
        self.callback_errors = 0

        def _sample(_ctx, data, size):
            try:
                self._user_cb(ctypes.string_at(data, size))
            except Exception:
                self.callback_errors += 1
            return 0

        self._cb = RINGBUF_SAMPLE_FN(_sample)  # kept alive while the ring buffer lives
        self._rb = lb.check_ptr(lb.lib.ring_buffer__new(rb_map.fd, self._cb, None, None),
                                f"ring_buffer__new({rb_map.name})")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms and consume; returns records consumed."""
        rc = self._lb.lib.ring_buffer__poll(self._rb, timeout_ms)
        if rc < 0 and -rc == _errno.EINTR:
            return 0
        return self._lb.check_rc(rc, "ring_buffer__poll")

    def consume(self) -> int:
        return self._lb.check_rc(self._lb.lib.ring_buffer__consume(self._rb), "ring_buffer__consume")

    def epoll_fd(self) -> int:
        return self._lb.check_rc(self._lb.lib.ring_buffer__epoll_fd(self._rb), "ring_buffer__epoll_fd")

    def free(self) -> None:
        if self._rb:
            self._lb.lib.ring_buffer__free(self._rb)
            self._rb = None

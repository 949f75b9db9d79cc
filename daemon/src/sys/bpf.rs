//! The bpf(2) commands aya does not offer as we need them: element operations on the
//! REUSEPORT_SOCKARRAY (aya's wrapper forces 4-byte values, which cannot be read back),
//! the shared mapping of the steering index, and a task iterator over one process.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use super::owned_fd;

/// `union bpf_attr` as used by the map element commands.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn map_elem(
    cmd: libc::c_int,
    map: BorrowedFd<'_>,
    key: *const u32,
    value: u64,
    flags: u64,
) -> io::Result<()> {
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as u64,
        value,
        flags,
    };
    // SAFETY: `attr` is a fully initialised bpf_attr prefix of the size we pass; the
    // pointers in it (key, value) point at live locals of the callers for the whole
    // call, sized as the map declares (4-byte key, 8-byte value).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw const attr,
            size_of::<MapElemAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
/// Update only an empty slot.
pub const BPF_NOEXIST: u64 = 1;

/// Puts the socket `sock` into `slot` of a REUSEPORT_SOCKARRAY with 8-byte values.
pub fn sockarray_insert(
    map: BorrowedFd<'_>,
    slot: u32,
    sock: BorrowedFd<'_>,
    flags: u64,
) -> io::Result<()> {
    let value = sock.as_raw_fd() as u64;
    map_elem(
        BPF_MAP_UPDATE_ELEM,
        map,
        &slot,
        (&raw const value) as u64,
        flags,
    )
}

/// The cookie of the socket in `slot`, `None` if the slot is empty.
pub fn sockarray_cookie(map: BorrowedFd<'_>, slot: u32) -> io::Result<Option<u64>> {
    let mut value: u64 = 0;
    match map_elem(BPF_MAP_LOOKUP_ELEM, map, &slot, (&raw mut value) as u64, 0) {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Empties `slot`; an already empty slot is not an error.
pub fn sockarray_remove(map: BorrowedFd<'_>, slot: u32) -> io::Result<()> {
    match map_elem(BPF_MAP_DELETE_ELEM, map, &slot, 0, 0) {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
        _ => Ok(()),
    }
}

/// A shared mapping of a one-entry `BPF_F_MMAPABLE` u32 array: the steering index.
///
/// Stores through it are single atomic 4-byte writes, which the program can never see
/// half done (a map update syscall is a memcpy and gives no such promise).
#[derive(Debug)]
pub struct MappedIndex {
    ptr: NonNull<AtomicU32>,
    len: usize,
}

// SAFETY: the mapping is only accessed through `AtomicU32`, which is Sync, and it stays
// valid until `Drop` unmaps it.
unsafe impl Send for MappedIndex {}
// SAFETY: as above.
unsafe impl Sync for MappedIndex {}

impl MappedIndex {
    /// Maps the first page of the array behind `map`.
    pub fn new(map: impl AsFd) -> io::Result<Self> {
        // SAFETY: sysconf has no memory arguments.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let len = usize::try_from(page).map_err(|_| io::Error::other("bad page size"))?;
        // SAFETY: a fresh shared mapping of a BPF array fd: the kernel validates the fd,
        // the flags and the length; we pass no address, so no existing mapping is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<AtomicU32>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }

    /// The index in force.
    pub fn load(&self) -> u32 {
        // SAFETY: the mapping is page-aligned, at least 4 bytes long and alive while
        // `self` is; the kernel and other mappings only access it atomically or with
        // aligned 4-byte loads.
        unsafe { self.ptr.as_ref() }.load(Ordering::SeqCst)
    }

    /// Flips the index in one atomic store.
    pub fn store(&self, value: u32) {
        // SAFETY: as in `load`.
        unsafe { self.ptr.as_ref() }.store(value, Ordering::SeqCst);
    }
}

impl Drop for MappedIndex {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, unmapped once, and no
        // reference into the mapping outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[repr(C)]
struct LinkCreateIterAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    _pad: u32,
}

/// `union bpf_iter_link_info`, its `task` member (the union is 16 bytes).
#[repr(C)]
struct IterTaskInfo {
    tid: u32,
    pid: u32,
    pid_fd: u32,
    _pad: u32,
}

#[repr(C)]
struct IterCreateAttr {
    link_fd: u32,
    flags: u32,
}

const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_ITER_CREATE: libc::c_int = 33;
const BPF_TRACE_ITER: u32 = 28;

/// Opens a run of the task iterator program `prog` over the tasks of process `pid`
/// only (Linux >= 6.1; older kernels refuse with EINVAL). Reading the returned fd to its
/// end runs the program.
pub fn iter_task_of(prog: BorrowedFd<'_>, pid: u32) -> io::Result<OwnedFd> {
    let info = IterTaskInfo {
        tid: 0,
        pid,
        pid_fd: 0,
        _pad: 0,
    };
    let attr = LinkCreateIterAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: 0,
        attach_type: BPF_TRACE_ITER,
        flags: 0,
        iter_info: (&raw const info) as u64,
        iter_info_len: size_of::<IterTaskInfo>() as u32,
        _pad: 0,
    };
    // SAFETY: `attr` is a fully initialised bpf_attr prefix of the size we pass, and its
    // `iter_info` points at `info`, a live local of the size given, for the whole call.
    // A link fd is returned on success and owned from here on.
    let link = owned_fd(unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &raw const attr,
            size_of::<LinkCreateIterAttr>() as libc::c_uint,
        )
    })?;
    let attr = IterCreateAttr {
        link_fd: link.as_raw_fd() as u32,
        flags: 0,
    };
    // SAFETY: as above, with a live link fd; the iterator takes its own reference to the
    // link, so `link` may close when this returns.
    owned_fd(unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ITER_CREATE,
            &raw const attr,
            size_of::<IterCreateAttr>() as libc::c_uint,
        )
    })
}

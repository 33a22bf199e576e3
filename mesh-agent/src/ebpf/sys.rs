//! The few bpf(2) commands aya 0.14 does not offer (or offers only behind `&mut`), as thin
//! wrappers: getting and pinning an object, looking up and deleting a map entry in one call,
//! and the small array map of the layout record (made outside the eBPF object). The syscall
//! wrapper and the link swap are `mesh_api::kernel`'s, shared with its probes.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use mesh_api::kernel::bpf;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// `BPF_MAP_TYPE_ARRAY`.
pub const MAP_TYPE_ARRAY: u32 = 2;

/// Pins a bpf object (map, program or link) at `path` on bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let attr = ObjPin { pathname: c.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, file_flags: 0 };
    bpf(BPF_OBJ_PIN, &attr).map(drop)
}

/// Makes an array map of `entries` u32 values (zeroed), named `name` for bpftool (at most 15
/// bytes: letters, digits and `_`).
pub fn array_u32_create(name: &str, entries: u32) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }
    let mut map_name = [0u8; 16];
    let n = name.len().min(15);
    map_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let attr = MapCreate {
        map_type: MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: entries,
        map_flags: 0,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
    };
    let fd = bpf(BPF_MAP_CREATE, &attr)?;
    // SAFETY: the kernel returned a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A map's shape, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// The shape of the map behind `fd` (an error if it is no map).
pub fn map_shape(fd: BorrowedFd<'_>) -> std::io::Result<MapShape> {
    /// The head of `struct bpf_map_info`; the kernel fills no more than `info_len` bytes.
    #[repr(C)]
    #[derive(Default)]
    struct MapInfo {
        map_type: u32,
        id: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        name: [u8; 16],
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = MapInfo::default();
    let attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<MapInfo>() as u32,
        info: &mut info as *mut MapInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok(MapShape {
        map_type: info.map_type,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
    })
}

/// Looks up one element of an array map of u32 (the caller has checked its shape with
/// [`map_shape`]: the kernel writes `value_size` bytes).
pub fn array_u32_get(map: BorrowedFd<'_>, index: u32) -> std::io::Result<u32> {
    let mut value = 0u32;
    let attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &index as *const u32 as u64,
        value: &mut value as *mut u32 as u64,
        flags: 0,
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &attr)?;
    Ok(value)
}

/// Sets one element of an array map of u32.
pub fn array_u32_set(map: BorrowedFd<'_>, index: u32, value: u32) -> std::io::Result<()> {
    let attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &index as *const u32 as u64,
        value: &value as *const u32 as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &attr).map(drop)
}

/// Opens a pinned bpffs object (map, program or link).
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let attr = ObjGet { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: 0 };
    let fd = bpf(BPF_OBJ_GET, &attr)?;
    // SAFETY: the kernel returned a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Looks up `key` and deletes it, returning the value: one call where the kernel has it
/// (hash maps since Linux 5.14), else a lookup and a delete. `None` when absent.
pub fn lookup_and_delete<K: Copy, V: Copy + Default>(map: BorrowedFd<'_>, key: &K) -> std::io::Result<Option<V>> {
    let mut value = V::default();
    let attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &attr) {
        Ok(_) => return Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        // Older kernels: not supported for this map type.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(524)) => {}
        Err(e) => return Err(e),
    }
    match bpf(BPF_MAP_LOOKUP_ELEM, &attr) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    }
    let del = MapElem { value: 0, ..attr };
    match bpf(BPF_MAP_DELETE_ELEM, &del) {
        Ok(_) => Ok(Some(value)),
        // Taken by someone else between the two calls.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> std::io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statfs is plain old data; an all-zero value is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain old data.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An array map of u64 mapped into this process (the map was made with `BPF_F_MMAPABLE`):
/// its elements are shared with the kernel programs, which update them with atomic adds, so
/// the agent may update them atomically too.
pub struct MappedU64Array {
    ptr: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is only reached through `&AtomicU64`s, which are Sync; it lives until
// drop, which unmaps it.
unsafe impl Send for MappedU64Array {}
// SAFETY: as above.
unsafe impl Sync for MappedU64Array {}

impl MappedU64Array {
    /// Maps `entries` u64 elements of the array map `map`.
    pub fn map(map: BorrowedFd<'_>, entries: u32) -> std::io::Result<MappedU64Array> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = entries as usize;
        let bytes = (len * 8).div_ceil(page).max(1) * page;
        // SAFETY: a fresh shared mapping of the map's descriptor; the kernel checks the length
        // against the map's size and that it may be mapped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(MappedU64Array { ptr, len, bytes })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, i: usize) -> Option<&std::sync::atomic::AtomicU64> {
        // SAFETY: in bounds of the mapping, 8-byte aligned (a page-aligned array of u64), and
        // only ever accessed atomically from this side.
        (i < self.len).then(|| unsafe { &*self.ptr.as_ptr().add(i) })
    }
}

impl Drop for MappedU64Array {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, no references outlive self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

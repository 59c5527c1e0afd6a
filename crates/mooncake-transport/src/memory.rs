//! Registered memory.
//!
//! An [`Arena`] is engine-owned memory: a memfd, sealed against shrinking so that a peer that
//! maps it can never fault on a truncated file, mapped shared into this process. A [`Region`]
//! is any registered range (an arena, or caller memory kept alive by an owner object), and the
//! [`MemoryRegistry`] answers the one question every transport asks: does `[addr, addr+len)`
//! lie inside one registered region?
//!
//! Lifetime rule: a lookup hands out an `Arc<Region>`, which keeps the memory mapped (and a
//! caller's buffer referenced) until the transfer that uses it drops it. Unregistering a
//! region that a transfer still holds fails with `ERR_BUFFER_BUSY` instead of pulling memory
//! from under it.
//!
//! A peer's request served from this side is held differently: by a [`PeerHold`], which
//! touches the memory only inside [`PeerHold::access`], under the region's hold lock.
//! [`Region::revoke_peer_holds`] takes that lock, so once it returns no peer's request reads
//! or writes the region again, and its holds no longer count as users: a peer that declares a
//! write and stalls cannot keep the owner from unregistering.

use std::any::Any;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use mooncake_common::{Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use crate::shm::control::Slot;

/// A shared read-write mapping of a file descriptor, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; any thread may read or
// write it, and access discipline is the transfer rule documented on the module.
unsafe impl Send for Mapping {}
// SAFETY: as above; the struct itself is immutable after creation.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `fd` shared, read-write.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::invalid("cannot map 0 bytes"));
        }
        // SAFETY: maps `len` bytes of a descriptor the caller vouches for; the result is
        // checked and unmapped only in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os_error("mmap"));
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| os_error("mmap"))?;
        Ok(Self { ptr, len })
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: mappings are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("addr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map`; no reference into it outlives
        // this value.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Engine-owned shared memory: a memfd sealed against shrinking (and growing), mapped
/// read-write. A same-host peer that maps the same memfd can never fault on a truncated file.
#[derive(Debug)]
pub struct Arena {
    id: u64,
    mapping: Mapping,
    fd: OwnedFd,
}

impl Arena {
    /// Creates and maps `len` zeroed bytes named `name` (visible in `/proc/<pid>/fd`).
    pub fn new(name: &str, len: usize) -> Result<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        if len == 0 {
            return Err(Error::invalid("cannot allocate 0 bytes"));
        }
        let cname = CString::new(name).map_err(|_| Error::invalid("arena name contains NUL"))?;
        // SAFETY: FFI call with a valid NUL-terminated name; the result is checked.
        let raw = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(os_error("memfd_create"));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size =
            libc::off_t::try_from(len).map_err(|_| Error::invalid("allocation too large"))?;
        // SAFETY: FFI calls on a descriptor we own; results are checked.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(os_error("ftruncate"));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(os_error("seal memfd"));
        }
        let mapping = Mapping::map(fd.as_fd(), len)?;
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            mapping,
            fd,
        })
    }

    /// Process-unique id, by which same-host peers ask for this arena.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.mapping.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mapping.len()
    }

    /// Always false: arenas are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memfd, for passing to a same-host peer.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Backs every page with memory now, so that later writes do not fault page by page and a
    /// host without the memory says so here (`ERR_MEMORY`) rather than with a SIGBUS later.
    /// Blocks for about a quarter of a second per GiB; call it before the arena is shared.
    pub fn populate(&self) -> Result<()> {
        // SAFETY: advice over exactly this live mapping; the kernel checks the range.
        let advised =
            unsafe { libc::madvise(self.as_ptr().cast(), self.len(), libc::MADV_POPULATE_WRITE) };
        if advised == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINVAL) {
            return Err(Error::new(
                ErrorKind::Memory,
                format!("cannot back {} bytes with memory: {error}", self.len()),
            )
            .with_source(error));
        }
        // Kernels before 5.14 lack the advice: write each page once instead.
        for offset in (0..self.len()).step_by(4096) {
            // SAFETY: `offset` lies inside the mapping, and rewriting a byte with its own value
            // changes nothing for a caller that has not shared the arena yet.
            unsafe {
                let byte = self.as_ptr().add(offset);
                std::ptr::write_volatile(byte, std::ptr::read_volatile(byte));
            }
        }
        Ok(())
    }
}

fn os_error(what: &str) -> Error {
    let io = std::io::Error::last_os_error();
    Error::new(ErrorKind::Memory, format!("{what}: {io}")).with_source(io)
}

/// What keeps a region's memory alive.
pub enum Backing {
    /// Engine-owned.
    Arena(Arc<Arena>),
    /// Caller-owned memory, kept alive by this owner (a reference to a JavaScript buffer).
    External(Box<dyn Any + Send + Sync>),
}

/// A registered range.
pub struct Region {
    addr: usize,
    len: usize,
    location: String,
    backing: Backing,
    slot: Option<Slot>,
    remote: bool,
    holds: Mutex<Holds>,
}

/// Peers' holds on a region.
#[derive(Default)]
struct Holds {
    /// Advanced by each revocation; a hold of an earlier epoch is revoked.
    epoch: u64,
    /// Revoked holds not dropped yet: their references do not count as users.
    revoked: usize,
    /// Live holds of the current epoch.
    live: usize,
    /// Cancelled by the next revocation.
    cancel: CancellationToken,
}

/// A peer's request's hold on a region (see the module's lifetime rule).
pub struct PeerHold {
    region: Option<Arc<Region>>,
    epoch: u64,
    revoked: CancellationToken,
}

impl PeerHold {
    /// The region held.
    pub fn region(&self) -> &Region {
        self.region.as_ref().expect("present until drop")
    }

    /// Runs `f` on the region unless the hold was revoked. A revocation waits for `f`, so `f`
    /// must not block: one non-blocking read or write of a socket, say.
    pub fn access<R>(&self, f: impl FnOnce(&Region) -> R) -> Option<R> {
        let region = self.region();
        let holds = region.holds();
        (holds.epoch == self.epoch).then(|| f(region))
    }

    /// Resolves once the hold is revoked.
    pub async fn revoked(&self) {
        self.revoked.cancelled().await;
    }
}

impl Drop for PeerHold {
    fn drop(&mut self) {
        let Some(region) = self.region.take() else {
            return;
        };
        {
            let mut holds = region.holds();
            if holds.epoch == self.epoch {
                holds.live = holds.live.saturating_sub(1);
            } else {
                holds.revoked = holds.revoked.saturating_sub(1);
            }
        }
        // Between the count above and this drop the reference still counts: an unregister in
        // that instant sees a user too many and answers busy, never too few.
        drop(region);
    }
}

impl Region {
    /// The whole of `arena`.
    pub fn arena(arena: Arc<Arena>, location: &str) -> Self {
        Self {
            addr: arena.as_ptr() as usize,
            len: arena.len(),
            location: location.to_owned(),
            backing: Backing::Arena(arena),
            slot: None,
            remote: true,
            holds: Mutex::default(),
        }
    }

    /// Caller memory at `addr..addr+len`, kept alive by `owner`.
    ///
    /// # Safety
    /// The range must be valid for reads and writes for as long as `owner` lives.
    pub unsafe fn external(
        addr: usize,
        len: usize,
        location: &str,
        owner: Box<dyn Any + Send + Sync>,
    ) -> Self {
        Self {
            addr,
            len,
            location: location.to_owned(),
            backing: Backing::External(owner),
            slot: None,
            remote: true,
            holds: Mutex::default(),
        }
    }

    fn holds(&self) -> std::sync::MutexGuard<'_, Holds> {
        self.holds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Revokes every peer's hold: when this returns, no peer's request touches the region
    /// again, and the holds' tasks are told to let go. Returns how many were revoked.
    pub fn revoke_peer_holds(&self) -> usize {
        let mut holds = self.holds();
        let live = std::mem::take(&mut holds.live);
        holds.revoked = holds.revoked.saturating_add(live);
        holds.epoch = holds.epoch.wrapping_add(1);
        std::mem::take(&mut holds.cancel).cancel();
        live
    }

    /// References to `region` that count as users: all but those of revoked peer holds.
    pub fn users(region: &Arc<Self>) -> usize {
        let revoked = region.holds().revoked;
        Arc::strong_count(region).saturating_sub(revoked)
    }

    /// Tags the region with its slot in the shared-memory control table.
    pub fn with_slot(mut self, slot: Option<Slot>) -> Self {
        self.slot = slot;
        self
    }

    /// Marks the region private: usable by this engine's own transfers, invisible to peers
    /// (Mooncake's `remote_accessible = false`).
    pub fn private(mut self) -> Self {
        self.remote = false;
        self
    }

    /// Whether peers may read and write it.
    pub fn is_remote(&self) -> bool {
        self.remote
    }

    /// Its slot in the shared-memory control table, if same-host peers may reach it.
    pub fn slot(&self) -> Option<Slot> {
        self.slot
    }

    /// The arena behind the region, if engine-owned.
    pub fn backing_arena(&self) -> Option<&Arc<Arena>> {
        match &self.backing {
            Backing::Arena(arena) => Some(arena),
            Backing::External(_) => None,
        }
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never, once registered).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `cpu:N`, `*`, ...
    pub fn location(&self) -> &str {
        &self.location
    }

    /// What keeps the memory alive.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// Whether `[addr, addr+len)` lies inside this region.
    pub fn contains(&self, addr: usize, len: usize) -> bool {
        addr >= self.addr
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.addr + self.len)
    }

    /// The bytes at `[addr, addr+len)`, for a transport to send.
    ///
    /// # Safety
    /// The range must lie inside this region, and no one may write it meanwhile (the transfer
    /// rule: JavaScript leaves buffers alone while a transfer that uses them is pending).
    pub unsafe fn bytes(&self, addr: usize, len: usize) -> &[u8] {
        debug_assert!(self.contains(addr, len));
        // SAFETY: in bounds of a live mapping, per the caller's contract.
        unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
    }

    /// The bytes at `[addr, addr+len)`, for a transport to fill.
    ///
    /// # Safety
    /// As for [`bytes`](Self::bytes), and no one may read or write the range meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, addr: usize, len: usize) -> &mut [u8] {
        debug_assert!(self.contains(addr, len));
        // SAFETY: in bounds of a live mapping, per the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
    }
}

/// Every registered range of one engine, keyed by start address.
#[derive(Default)]
pub struct MemoryRegistry {
    regions: RwLock<BTreeMap<usize, Arc<Region>>>,
}

impl MemoryRegistry {
    /// Registers `region`, refusing zero length and overlaps.
    pub fn register(&self, region: Region) -> Result<Arc<Region>> {
        if region.len == 0 {
            return Err(Error::invalid("cannot register an empty buffer"));
        }
        let end = region
            .addr
            .checked_add(region.len)
            .ok_or_else(|| Error::invalid("buffer wraps the address space"))?;
        let mut regions = self.write();
        let before = regions.range(..end).next_back();
        if let Some((_, prev)) = before {
            if prev.addr + prev.len > region.addr {
                return Err(Error::new(
                    ErrorKind::AddressOverlapped,
                    format!(
                        "[{:#x}, {end:#x}) overlaps the registered buffer at {:#x} ({} bytes)",
                        region.addr, prev.addr, prev.len
                    ),
                ));
            }
        }
        let region = Arc::new(region);
        regions.insert(region.addr, region.clone());
        Ok(region)
    }

    /// The region that holds `[addr, addr+len)` whole.
    pub fn find(&self, addr: usize, len: usize) -> Option<Arc<Region>> {
        let regions = self.read();
        let (_, region) = regions.range(..=addr).next_back()?;
        region.contains(addr, len).then(|| region.clone())
    }

    /// Unregisters the region starting at `addr`. Fails with `ERR_BUFFER_BUSY` while a
    /// transfer holds it, and `ERR_ADDRESS_NOT_REGISTERED` if nothing starts there.
    pub fn unregister(&self, addr: usize) -> Result<Arc<Region>> {
        let mut regions = self.write();
        let Some(region) = regions.get(&addr) else {
            return Err(Error::new(
                ErrorKind::AddressNotRegistered,
                format!("no registered buffer starts at {addr:#x}"),
            ));
        };
        // Lookups clone under the read lock, so with the write lock held this count is exact
        // (or one too many, for an instant, while a revoked hold is dropped).
        if Region::users(region) > 1 {
            return Err(Error::new(
                ErrorKind::BufferBusy,
                format!("the buffer at {addr:#x} is in use by a pending transfer"),
            ));
        }
        Ok(regions.remove(&addr).expect("present under the same lock"))
    }

    /// The peer-visible region that holds `[addr, addr+len)` whole.
    pub fn find_remote(&self, addr: usize, len: usize) -> Option<Arc<Region>> {
        self.find(addr, len).filter(|r| r.remote)
    }

    /// A peer's hold on the peer-visible region that holds `[addr, addr+len)` whole.
    pub fn hold_remote(&self, addr: usize, len: usize) -> Option<PeerHold> {
        // Under the read lock, so an unregister (write lock) sees the hold counted.
        let regions = self.read();
        let (_, region) = regions.range(..=addr).next_back()?;
        if !region.remote || !region.contains(addr, len) {
            return None;
        }
        let (epoch, revoked) = {
            let mut holds = region.holds();
            holds.live = holds.live.saturating_add(1);
            (holds.epoch, holds.cancel.clone())
        };
        Some(PeerHold {
            region: Some(region.clone()),
            epoch,
            revoked,
        })
    }

    /// The region that starts at `addr`.
    pub fn starting_at(&self, addr: usize) -> Option<Arc<Region>> {
        self.read().get(&addr).cloned()
    }

    /// The registered arena with `id`.
    pub fn arena(&self, id: u64) -> Option<Arc<Arena>> {
        self.read()
            .values()
            .find_map(|region| region.backing_arena().filter(|a| a.id() == id).cloned())
    }

    /// Every registered region, in address order.
    pub fn regions(&self) -> Vec<Arc<Region>> {
        self.read().values().cloned().collect()
    }

    /// Drops every registration (transfers that hold a region keep it alive).
    pub fn clear(&self) {
        self.write().clear();
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<usize, Arc<Region>>> {
        // The map is never left half-updated, so a poisoned lock is still consistent.
        self.regions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<usize, Arc<Region>>> {
        self.regions.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(addr: usize, len: usize) -> Region {
        // SAFETY: these regions are only looked up, never read or written.
        unsafe { Region::external(addr, len, "*", Box::new(())) }
    }

    #[test]
    fn overlaps_are_refused_and_lookups_need_one_region() {
        let registry = MemoryRegistry::default();
        registry.register(fake(0x1000, 0x1000)).unwrap();
        registry.register(fake(0x2000, 0x1000)).unwrap();
        let err = registry.register(fake(0x1800, 0x100)).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::AddressOverlapped);
        assert_eq!(
            registry.register(fake(0xf00, 0x101)).err().unwrap().kind(),
            ErrorKind::AddressOverlapped
        );
        assert!(registry.find(0x1000, 0x1000).is_some());
        assert!(registry.find(0x1800, 0x1000).is_none(), "spans two regions");
        assert!(registry.find(0x3000, 1).is_none());
        assert!(registry.find(usize::MAX, 2).is_none());
    }

    #[test]
    fn busy_regions_stay_registered() {
        let registry = MemoryRegistry::default();
        registry.register(fake(0x1000, 0x1000)).unwrap();
        let held = registry.find(0x1100, 16).unwrap();
        assert_eq!(
            registry.unregister(0x1000).err().unwrap().kind(),
            ErrorKind::BufferBusy
        );
        drop(held);
        registry.unregister(0x1000).unwrap();
        assert_eq!(
            registry.unregister(0x1000).err().unwrap().kind(),
            ErrorKind::AddressNotRegistered
        );
    }

    #[test]
    fn revoked_peer_holds_touch_nothing_and_count_for_nothing() {
        let registry = MemoryRegistry::default();
        registry.register(fake(0x1000, 0x1000)).unwrap();
        assert!(registry.hold_remote(0x1800, 0x1000).is_none());
        let stalled = registry.hold_remote(0x1000, 16).unwrap();
        assert_eq!(stalled.access(|r| r.addr()), Some(0x1000));
        assert_eq!(
            registry.unregister(0x1000).err().unwrap().kind(),
            ErrorKind::BufferBusy,
            "a live hold is a user"
        );
        let region = registry.starting_at(0x1000).unwrap();
        assert_eq!(region.revoke_peer_holds(), 1);
        drop(region);
        assert_eq!(stalled.access(|_| ()), None, "revoked");
        {
            use std::future::Future;
            let mut revoked = std::pin::pin!(stalled.revoked());
            let waker = std::task::Waker::noop();
            assert!(revoked
                .as_mut()
                .poll(&mut std::task::Context::from_waker(waker))
                .is_ready());
        }
        // A hold taken after the revocation is live again.
        let fresh = registry.hold_remote(0x1000, 16).unwrap();
        assert!(fresh.access(|_| ()).is_some());
        assert_eq!(
            registry.unregister(0x1000).err().unwrap().kind(),
            ErrorKind::BufferBusy
        );
        drop(fresh);
        let unregistered = registry.unregister(0x1000).unwrap();
        assert_eq!(
            Arc::strong_count(&unregistered),
            2,
            "the stalled hold keeps it"
        );
        assert_eq!(Region::users(&unregistered), 1, "but is no user");
        drop(stalled);
        assert_eq!(Region::users(&unregistered), 1);
    }

    #[test]
    fn arenas_are_sealed_against_shrinking() {
        let arena = Arena::new("test", 1 << 16).unwrap();
        // SAFETY: writes inside the fresh mapping.
        unsafe { arena.as_ptr().add(100).write(7) };
        // SAFETY: FFI call on our own descriptor.
        let rc = unsafe { libc::ftruncate(arena.fd().as_raw_fd(), 4096) };
        assert_ne!(rc, 0, "shrinking a sealed arena must fail");
        // SAFETY: reads inside the mapping.
        assert_eq!(unsafe { arena.as_ptr().add(100).read() }, 7);
        assert!(Arena::new("zero", 0).is_err());
    }

    fn resident_pages(arena: &Arena) -> usize {
        let mut pages = vec![0u8; arena.len().div_ceil(4096)];
        // SAFETY: FFI call over our own mapping with a vector of one byte per page.
        let rc = unsafe { libc::mincore(arena.as_ptr().cast(), arena.len(), pages.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        pages.iter().filter(|p| *p & 1 == 1).count()
    }

    #[test]
    fn populate_backs_every_page_and_keeps_the_bytes() {
        let arena = Arena::new("test", 64 << 12).unwrap();
        // SAFETY: writes inside the fresh mapping.
        unsafe { arena.as_ptr().add(5 << 12).write(9) };
        assert!(
            resident_pages(&arena) < 64,
            "a fresh arena is not backed yet"
        );
        arena.populate().unwrap();
        assert_eq!(resident_pages(&arena), 64);
        // SAFETY: reads inside the mapping.
        assert_eq!(unsafe { arena.as_ptr().add(5 << 12).read() }, 9);
    }
}

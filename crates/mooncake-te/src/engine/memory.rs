//! Registered memory: engine-owned arenas and caller buffers, registered with every
//! transport that can reach them.

use super::*;

impl TransferEngine {
    /// Allocates and registers `len` bytes of engine memory.
    pub fn allocate(&self, len: usize) -> Result<Arc<Arena>> {
        self.ensure_open()?;
        let arena = Arc::new(Arena::new("mooncake-segment", len)?);
        // The first touch places the page; the kernel then says where it went.
        // SAFETY: the arena is at least one byte long and mapped for reading.
        unsafe { std::ptr::read_volatile(arena.as_ptr()) };
        let location = memory_location(arena.as_ptr() as usize, len);
        self.register_region(Region::arena(arena.clone(), &location))?;
        Ok(arena)
    }

    /// Registers caller memory, kept alive by `owner` until unregistered.
    ///
    /// # Safety
    /// `[addr, addr+len)` must stay valid for reads and writes while `owner` lives.
    pub unsafe fn register(
        &self,
        addr: usize,
        len: usize,
        location: &str,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<()> {
        self.ensure_open()?;
        if addr == 0 {
            return Err(Error::invalid("cannot register a null address"));
        }
        let location = match location {
            "" | "*" => memory_location(addr, len),
            given => given.to_owned(),
        };
        // SAFETY: forwarded from the caller's contract.
        let region = unsafe { Region::external(addr, len, &location, owner) };
        self.register_region(region)
    }

    /// Registers caller memory for this engine's own transfers only: peers never see it, and
    /// nothing is published (Mooncake's `remote_accessible = false`). Cheap enough to wrap a
    /// single transfer.
    ///
    /// # Safety
    /// As for [`register`](Self::register).
    pub unsafe fn register_private(
        &self,
        addr: usize,
        len: usize,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<()> {
        self.ensure_open()?;
        if addr == 0 {
            return Err(Error::invalid("cannot register a null address"));
        }
        // SAFETY: forwarded from the caller's contract.
        let region = unsafe { Region::external(addr, len, "*", owner) }.private();
        let region = self.local.registry.register(region)?;
        if let Some(rdma) = &self.local.rdma {
            if let Err(e) = rdma.register(&region) {
                drop(region);
                let _ = self.local.registry.unregister(addr);
                return Err(e);
            }
        }
        Ok(())
    }

    pub(super) fn register_region(&self, region: Region) -> Result<()> {
        let control = self.local.shm.as_ref().map(|(control, _)| control);
        let slot = control.and_then(|c| c.claim());
        let registered = self
            .local
            .registry
            .register(region.with_slot(slot))
            .and_then(|region| {
                let Some(rdma) = &self.local.rdma else {
                    return Ok(());
                };
                let keyed = rdma.register(&region);
                if keyed.is_err() {
                    let addr = region.addr();
                    drop(region);
                    let _ = self.local.registry.unregister(addr);
                }
                keyed
            });
        if let Err(e) = registered {
            if let (Some(control), Some(slot)) = (control, slot) {
                control.retire(slot, Duration::ZERO);
                control.release(slot);
            }
            return Err(e);
        }
        self.registrations_changed();
        Ok(())
    }

    /// Unregisters the buffer that starts at `addr`. Peers' requests served over TCP are
    /// revoked (they never touch the buffer again); fails with `ERR_BUFFER_BUSY` while one of
    /// our transfers, or a same-host peer's copy, is using it.
    pub fn unregister(&self, addr: usize) -> Result<()> {
        let found = self.local.registry.starting_at(addr);
        if let Some(region) = &found {
            let revoked = region.revoke_peer_holds();
            if revoked > 0 {
                tracing::debug!("unregistering {addr:#x} revoked {revoked} peer requests");
            }
        }
        let published = found.as_ref().is_some_and(|r| r.is_remote());
        let shared =
            found.and_then(|region| Some((region.slot()?, region.backing_arena().is_none())));
        let control = self.local.shm.as_ref().map(|(control, _)| control);
        let mut drained = true;
        if let (Some(control), Some((slot, external))) = (control, shared) {
            drained = control.retire(slot, SHM_DRAIN);
            // A peer still copying into caller memory could outlive that memory: refuse. An
            // arena stays mapped in the peer whatever we do, so it may go.
            if !drained && external {
                control.restore(slot);
                return Err(Error::new(
                    ErrorKind::BufferBusy,
                    format!("a same-host peer is still copying at {addr:#x}"),
                ));
            }
        }
        // The RDMA transport holds the region while its keys are out; they go first, unless a
        // transfer holds it too (ours: the registry's, the transport's and this one).
        let rdma = self.local.rdma.as_ref();
        if let Some(rdma) = rdma {
            let holders = self
                .local
                .registry
                .starting_at(addr)
                .map(|r| Region::users(&r));
            if holders.is_some_and(|n| n > 3) {
                if let (Some(control), Some((slot, _))) = (control, shared) {
                    control.restore(slot);
                }
                return Err(Error::new(
                    ErrorKind::BufferBusy,
                    format!("the buffer at {addr:#x} is in use by a pending transfer"),
                ));
            }
            let _ = rdma.unregister(addr);
        }
        if let Err(e) = self.local.registry.unregister(addr) {
            if let (Some(control), Some((slot, _))) = (control, shared) {
                control.restore(slot);
            }
            if let (Some(rdma), Some(region)) = (rdma, self.local.registry.starting_at(addr)) {
                match rdma.register(&region) {
                    // New keys: peers must see them.
                    Ok(()) => self.registrations_changed(),
                    Err(e) => {
                        tracing::warn!("{addr:#x} stays registered but lost its RDMA keys: {e}")
                    }
                }
            }
            return Err(e);
        }
        if let (Some(control), Some((slot, _)), true) = (control, shared, drained) {
            control.release(slot);
        }
        if published {
            self.registrations_changed();
        }
        Ok(())
    }

    /// Whether `[addr, addr+len)` lies inside one registered buffer.
    pub fn is_registered(&self, addr: usize, len: usize) -> bool {
        self.local.registry.find(addr, len).is_some()
    }
}

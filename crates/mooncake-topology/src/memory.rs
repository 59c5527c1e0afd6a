//! The NUMA node behind a virtual address.

use crate::matrix::WILDCARD;

/// The location of the buffer `[addr, addr + len)`: `cpu:<node>` of the NUMA node holding its
/// first page, as the kernel reports it through `move_pages`, or `"*"` when the range is empty,
/// unmapped, not yet faulted in, or the call is refused.
pub fn memory_location(addr: usize, len: usize) -> String {
    match first_page_node(addr, len) {
        Some(node) => format!("cpu:{node}"),
        None => WILDCARD.to_owned(),
    }
}

fn first_page_node(addr: usize, len: usize) -> Option<u32> {
    if addr == 0 || len == 0 {
        return None;
    }
    // SAFETY: sysconf reads a constant of the running system and has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page_size = usize::try_from(page_size)
        .ok()
        .filter(|p| p.is_power_of_two())?;
    let mut pages = [(addr & !(page_size - 1)) as *mut libc::c_void];
    let mut status: [libc::c_int; 1] = [libc::c_int::MIN];
    // SAFETY: with `nodes == NULL`, move_pages only queries: it reads `count` (1) pointers from
    // `pages` and writes `count` ints to `status`, both live local arrays of that length. The
    // queried address itself is never dereferenced by us; the kernel reports an unmapped or
    // absent page as a negative errno in `status`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0 as libc::pid_t,
            1 as libc::c_ulong,
            pages.as_mut_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0 as libc::c_int,
        )
    };
    if rc != 0 {
        tracing::debug!(
            addr,
            error = %std::io::Error::last_os_error(),
            "move_pages failed"
        );
        return None;
    }
    u32::try_from(status[0]).ok()
}
